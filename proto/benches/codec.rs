//! Codec throughput on a 10,000-reading `send` body in the extended form:
//! our parser alone, parse plus typed decode, encode, and `dxr`'s parser on
//! the same bytes as a baseline.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use proto::reading::{Event, Reading};
use proto::upload::{Batch, SendBody, SendRequest};
use proto::xmlrpc::{Limits, encode_call, parse_call};
use proto::{BatchId, Cid, Context, Mid, Payer, Pid};

const READINGS: usize = 10_000;
const CUSTOMERS: usize = 1_000;

/// A batch like a busy meter's: commits by 1,000 customers of 50 products,
/// every fifth one a component inside another product.
fn batch() -> SendRequest {
    let readings = (0..READINGS)
        .map(|index| {
            let pid = Pid::parse(&format!("B1-P{}", index % 50)).unwrap();
            let payer = if index % 5 == 0 {
                Payer::OwnerOf(Pid::parse(&format!("B1-P{}", (index + 1) % 50)).unwrap())
            } else {
                Payer::Customer(Cid::parse(&format!("B1-C{}", index % CUSTOMERS)).unwrap())
            };
            Reading {
                seq: 1_000_000 + index as u64,
                time_ms: 1_764_000_000_000 + index as u64,
                context: Context::parse(&format!("pid:{}", 1000 + index % 64)).unwrap(),
                event: Event::Commit {
                    pid,
                    payer: Some(payer),
                },
            }
        })
        .collect();
    SendRequest {
        mid: Mid::parse("B1-M1").unwrap(),
        body: SendBody::Batch(Batch {
            id: BatchId::parse("B1-M1:1000000").unwrap(),
            readings,
            parties: Vec::new(),
        }),
    }
}

fn codec(c: &mut Criterion) {
    let request = batch();
    let body = encode_call("send", &request.to_params());
    let text = std::str::from_utf8(&body).unwrap().to_owned();
    println!(
        "send body: {READINGS} readings, {} bytes ({} bytes per reading)",
        body.len(),
        body.len() / READINGS
    );
    let mut group = c.benchmark_group("send_10k");
    group.throughput(Throughput::Elements(READINGS as u64));
    group.sample_size(30);
    group.bench_function(BenchmarkId::new("parse", "proto"), |b| {
        b.iter(|| parse_call(&body, Limits::BACKOFFICE).unwrap())
    });
    group.bench_function(BenchmarkId::new("parse+decode", "proto"), |b| {
        b.iter(|| {
            let call = parse_call(&body, Limits::BACKOFFICE).unwrap();
            SendRequest::from_call(&call).unwrap()
        })
    });
    group.bench_function(BenchmarkId::new("decode_extended", "proto"), |b| {
        b.iter(|| SendRequest::decode_extended(&body, Limits::BACKOFFICE).unwrap())
    });
    group.bench_function(BenchmarkId::new("encode", "proto"), |b| {
        b.iter(|| encode_call("send", &request.to_params()))
    });
    group.bench_function(BenchmarkId::new("parse", "dxr"), |b| {
        b.iter(|| dxr::MethodCall::from_xml(&text).unwrap())
    });
    group.finish();
}

/// Everything the meter's codec does for one `query` round trip, both sides:
/// the client encodes the call, the server parses and decodes it and encodes
/// the answer, the client parses the answer.
fn meter_query(c: &mut Criterion) {
    use proto::meter_api::MeterCall;
    use proto::xmlrpc::{Value, encode_response, parse_response};
    let call = MeterCall::Query {
        pid: Pid::parse("B1-P7").unwrap(),
        context: Some(Context::parse("t1").unwrap()),
    };
    c.bench_function("meter_query_codec_round_trip", |b| {
        b.iter(|| {
            let (name, params) = call.to_call();
            let body = encode_call(name, &params);
            let parsed = parse_call(&body, Limits::METER_API).unwrap();
            let decoded = MeterCall::from_call(&parsed).unwrap();
            assert_eq!(decoded, call);
            let answer = encode_response(&Value::Bool(true));
            parse_response(&answer, Limits::METER_API).unwrap()
        })
    });
}

criterion_group!(benches, codec, meter_query);
criterion_main!(benches);
