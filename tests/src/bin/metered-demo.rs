//! A metered program: logs a customer in, then uses a product from several
//! threads, each use calling a metered component inside it. It shows the
//! client library at work and drives the end-to-end tests.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use meterd::client::Meter;
use proto::{Cid, Context, Pid};

const USAGE: &str = "usage: metered-demo SOCKET CID PRODUCT COMPONENT THREADS USES

Logs CID in, then runs THREADS threads (each in a context of its own), each
using PRODUCT USES times with one use of COMPONENT inside every use. Prints
how many uses were committed.";

struct Plan {
    socket: String,
    cid: Cid,
    product: Pid,
    component: Pid,
    threads: u32,
    uses: u32,
}

fn plan(args: &[String]) -> Result<Plan, String> {
    let [socket, cid, product, component, threads, uses] = args else {
        return Err(USAGE.to_owned());
    };
    Ok(Plan {
        socket: socket.clone(),
        cid: cid.parse().map_err(|error| format!("{error}"))?,
        product: product.parse().map_err(|error| format!("{error}"))?,
        component: component.parse().map_err(|error| format!("{error}"))?,
        threads: threads.parse().map_err(|_| "THREADS must be a number")?,
        uses: uses.parse().map_err(|_| "USES must be a number")?,
    })
}

/// One thread's work: returns how many uses of the product were committed.
fn work(plan: &Plan, thread: u32) -> Result<u32, String> {
    let context = Context::parse(&format!("t{thread}")).expect("valid context name");
    let mut meter = Meter::connect(&plan.socket).with_context(context);
    let mut committed = 0;
    for _ in 0..plan.uses {
        let Some(mut usage) = meter.begin(plan.product) else {
            continue;
        };
        // The component's use is charged to the product's owner.
        if let Some(inner) = usage.meter().begin(plan.component) {
            inner.commit().map_err(|error| error.to_string())?;
        }
        usage.commit().map_err(|error| error.to_string())?;
        committed += 1;
    }
    Ok(committed)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let plan = match plan(&args) {
        Ok(plan) => plan,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(64);
        }
    };
    let mut meter = Meter::connect(&plan.socket);
    if let Err(error) = meter.login(plan.cid) {
        eprintln!("metered-demo: login failed: {error}");
        return ExitCode::from(69);
    }
    let outcomes: Vec<Result<u32, String>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..plan.threads)
            .map(|thread| {
                let plan = &plan;
                scope.spawn(move || work(plan, thread))
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().expect("worker does not panic"))
            .collect()
    });
    let _ = meter.logout(plan.cid);
    let mut total = 0;
    for outcome in outcomes {
        match outcome {
            Ok(committed) => total += committed,
            Err(error) => {
                eprintln!("metered-demo: {error}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!("committed {total} uses of {}", plan.product);
    ExitCode::SUCCESS
}
