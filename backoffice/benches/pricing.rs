//! Pricing throughput on one core with the per-call limits in force: the
//! flat-price example priced in a fresh instance each time, with the cost of
//! instantiation alone measured beside it.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

use backoffice::pricing::{PriceInput, Pricing};
use proto::{Cid, Code, Pid};

#[path = "../tests/it/examples.rs"]
mod examples;

fn pricing(c: &mut Criterion) {
    let pricing = Pricing::new();
    let taca = pricing.load(&examples::module("flat")).unwrap();
    let input = PriceInput::invocation(
        Cid::parse("B1-C1").unwrap(),
        Code::Commit,
        Pid::parse("B1-P7").unwrap(),
        3,
    );
    let mut group = c.benchmark_group("taca_flat");
    group.throughput(Throughput::Elements(1));
    group.bench_function("price (instantiate + call)", |b| {
        b.iter(|| pricing.price(&taca, &input).unwrap())
    });
    group.bench_function("instantiate only", |b| {
        b.iter(|| pricing.instantiate_only(&taca).unwrap())
    });
    group.finish();
}

criterion_group!(benches, pricing);
criterion_main!(benches);
