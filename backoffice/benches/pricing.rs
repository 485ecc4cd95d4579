//! Pricing throughput on one core with the per-call limits in force: the
//! flat-price example priced as the backoffice prices it (a reused instance,
//! reset after each price), priced in a fresh instance each time, and the
//! cost of a fresh instance alone, also for the smallest possible module.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

use backoffice::pricing::{PriceInput, Pricing};
use proto::{Cid, Code, Pid};

#[path = "../tests/it/examples.rs"]
mod examples;

fn pricing(c: &mut Criterion) {
    let pricing = Pricing::new();
    let taca = pricing.load(&examples::module("flat")).unwrap();
    assert!(taca.reuses_instances());
    // Inputs that change from price to price, as in a batch.
    let inputs: Vec<PriceInput> = (0..1000u64)
        .map(|index| {
            PriceInput::invocation(
                Cid::parse(&format!("B1-C{}", 1 + index % 97)).unwrap(),
                if index % 5 == 0 {
                    Code::Query
                } else {
                    Code::Commit
                },
                Pid::parse("B1-P7").unwrap(),
                index,
            )
        })
        .collect();
    let mut group = c.benchmark_group("taca_flat");
    group.throughput(Throughput::Elements(1));
    let mut next = inputs.iter().cycle();
    group.bench_function("price (reused instance, reset)", |b| {
        b.iter(|| pricing.price(&taca, next.next().unwrap()).unwrap())
    });
    group.bench_function("price (fresh instance)", |b| {
        b.iter(|| pricing.price_fresh(&taca, next.next().unwrap()).unwrap())
    });
    group.bench_function("fresh instance only", |b| {
        b.iter(|| pricing.instantiate_only(&taca).unwrap())
    });
    let wat = wat::parse_file(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/flat.wat"
    ))
    .unwrap();
    let smallest = pricing.load(&wat).unwrap();
    group.bench_function("fresh instance only, hand-written module", |b| {
        b.iter(|| pricing.instantiate_only(&smallest).unwrap())
    });
    group.finish();
}

criterion_group!(benches, pricing);
criterion_main!(benches);
