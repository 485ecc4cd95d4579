//! The README's run command and walk-through, run as written, so that the
//! README cannot rot.
//!
//! The run command starts the franchise in a temporary folder. Each shell
//! block of the walk-through runs in one `bash` there, as a reader's second
//! shell would (a `meterd login` covers the rest of its block), with the
//! `export` lines of earlier blocks. Only what cannot run as written inside
//! a test is mapped: `target/release/...` are links to the binaries built
//! for this test run, `cargo run ... --example editor --` runs the example
//! built the same way, and the franchise listens on a free port (the
//! environment says where). The browser steps are done over HTTP with the
//! values the README gives. A `# → TEXT` comment is output the command
//! must print.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{Running, start_with_env, workspace_binary};
use crate::web::{Visitor, registration};

const README: &str = include_str!("../../README.md");

/// The repository's top folder.
fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_owned()
}

/// The commands of the fenced `sh` blocks in `text`, one per command, with
/// continuation lines joined.
fn sh_blocks(text: &str) -> Vec<Vec<String>> {
    text.split("```sh\n")
        .skip(1)
        .map(|rest| {
            let block = rest.split("```").next().expect("a closed block");
            let mut commands = Vec::new();
            let mut pending = String::new();
            for line in block.lines() {
                let line = line.trim();
                if let Some(start) = line.strip_suffix('\\') {
                    pending.push_str(start);
                    pending.push(' ');
                    continue;
                }
                pending.push_str(line);
                if !pending.trim().is_empty() {
                    commands.push(std::mem::take(&mut pending));
                }
                pending.clear();
            }
            commands
        })
        .collect()
}

/// The built example `name` of package `package`, for this test run's
/// profile.
fn workspace_example(package: &str, name: &str) -> PathBuf {
    let test_exe = std::env::current_exe().unwrap();
    let profile_dir = test_exe.parent().and_then(Path::parent).unwrap();
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", package, "--example", name])
        .arg("--target-dir")
        .arg(profile_dir.parent().unwrap())
        .args(if profile_dir.ends_with("release") {
            &["--release"][..]
        } else {
            &[][..]
        })
        .current_dir(repository())
        .status()
        .unwrap();
    assert!(status.success(), "building example {name}");
    profile_dir.join("examples").join(name)
}

/// What one command of a block printed, and whether it succeeded.
struct Ran {
    command: String,
    output: String,
    status: i32,
}

/// Runs `commands` in one bash in `dir`, each marked off in the output.
fn run_block(dir: &Path, env: &BTreeMap<String, String>, commands: &[String]) -> Vec<Ran> {
    let mut script = String::new();
    for (index, command) in commands.iter().enumerate() {
        let mapped = command.replace(
            "cargo run --release -p meterd --example editor --",
            "target/release/examples/editor",
        );
        // The binaries are built and linked already.
        let mapped = if mapped.starts_with("cargo build --release -p meterd -p backoffice") {
            "true".to_owned()
        } else {
            mapped
        };
        script.push_str(&format!(
            "echo '@@start {index}'\n{mapped}\necho \"@@status {index} $?\"\n"
        ));
    }
    let cargo_dir = Path::new(env!("CARGO")).parent().unwrap();
    let path = format!(
        "{}:{}",
        cargo_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(dir)
        .envs(env)
        // A developer's own meter must not leak into the walk-through.
        .env_remove("METERD_SOCKET")
        .env("PATH", path)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("bash runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    commands
        .iter()
        .enumerate()
        .map(|(index, command)| {
            let start = format!("@@start {index}\n");
            let from = text
                .find(&start)
                .unwrap_or_else(|| panic!("`{command}` did not run:\n{text}"))
                + start.len();
            let status_marker = format!("@@status {index} ");
            let to = from
                + text[from..]
                    .find(&status_marker)
                    .unwrap_or_else(|| panic!("`{command}` did not finish:\n{text}"));
            let status = text[to + status_marker.len()..]
                .lines()
                .next()
                .and_then(|code| code.trim().parse().ok())
                .unwrap_or(-1);
            Ran {
                command: command.clone(),
                output: text[from..to].to_owned(),
                status,
            }
        })
        .collect()
}

fn check(ran: &[Ran]) {
    for step in ran {
        assert_eq!(
            step.status, 0,
            "`{}` failed:\n{}",
            step.command, step.output
        );
        if let Some((_, expected)) = step.command.split_once("# → ") {
            assert!(
                step.output.contains(expected.trim()),
                "`{}` printed {:?}, not {expected:?}",
                step.command,
                step.output
            );
        }
    }
}

/// The franchise, started by the README's run command in `dir`.
fn run_command(dir: &Path, env: &BTreeMap<String, String>) -> (Running, String) {
    let run_section = README
        .split("## Run it")
        .nth(1)
        .expect("README has a Run it section");
    let command = &sh_blocks(run_section)[0][0];
    assert_eq!(command, "cargo run --release -p franchise");
    let binary = workspace_binary("franchise", "franchise");
    let envs: Vec<(&str, &str)> = env
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .collect();
    // `./local-data` of a reader's shell is `local-data` in `dir` here.
    let data = dir.join("local-data");
    let running = start_with_env(
        binary.to_str().unwrap(),
        &["--data-dir", data.to_str().unwrap()],
        &envs,
    );
    let url = running
        .first_line
        .strip_prefix("franchise: web pages at ")
        .unwrap_or_else(|| panic!("the first line names the pages: {}", running.first_line))
        .trim_end_matches('/')
        .to_owned();
    (running, url)
}

#[test]
fn the_readme_run_command_and_walk_through_work_as_written() {
    walk_through(None);
}

/// The same walk-through with the branch in PostgreSQL (a throw-away
/// cluster): the franchise started with `BACKOFFICE_STORE`.
#[test]
fn the_readme_walk_through_works_with_the_branch_in_postgresql() {
    let cluster = pgtest::Cluster::start().unwrap();
    let url = cluster.create_database("branch").unwrap();
    walk_through(Some(&url));
    // The money moved there: Bob's deposit and his uses of Ada's editor,
    // with the balances kept beside them.
    let kept = cluster
        .psql(
            "branch",
            "SELECT count(*) FROM transfers; SELECT account, balance FROM balances ORDER BY account",
        )
        .unwrap();
    assert_eq!(
        kept.lines().collect::<Vec<_>>(),
        [
            "2",
            ":funding|-10.000000000",
            "B1-C2|1.500000000",
            "B1-C4|8.500000000"
        ],
        "{kept}"
    );
}

fn walk_through(store: Option<&str>) {
    let walk = README
        .split("<!-- walkthrough")
        .nth(1)
        .and_then(|rest| rest.split("<!-- /walkthrough -->").next())
        .expect("README has a walk-through between its markers");
    let blocks = sh_blocks(walk);
    assert_eq!(
        blocks.len(),
        4,
        "the test knows where the browser steps fall: after the first block and after the last"
    );
    let dir = tempfile::tempdir().unwrap();
    let repo = repository();
    for name in ["taca-sdk", "examples"] {
        std::os::unix::fs::symlink(repo.join(name), dir.path().join(name)).unwrap();
    }
    let links = dir.path().join("target/release/examples");
    std::fs::create_dir_all(&links).unwrap();
    for (package, name) in [("meterd", "meterd"), ("backoffice", "backoffice")] {
        std::os::unix::fs::symlink(
            workspace_binary(package, name),
            dir.path().join("target/release").join(name),
        )
        .unwrap();
    }
    std::os::unix::fs::symlink(workspace_example("meterd", "editor"), links.join("editor"))
        .unwrap();

    let mut env: BTreeMap<String, String> = [
        ("XDG_RUNTIME_DIR", dir.path().to_str().unwrap()),
        ("FRANCHISE_LISTEN", "127.0.0.1:0"),
        ("BACKOFFICE_PASSWORD_ITERATIONS", "1000"),
        ("FRANCHISE_LOG", "warn"),
        ("METERD_LOG", "warn"),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), value.to_owned()))
    .collect();
    env.remove("METERD_SOCKET");
    if let Some(url) = store {
        env.insert("BACKOFFICE_STORE".into(), url.to_owned());
    }
    let (mut franchise, url) = run_command(dir.path(), &env);
    env.insert("BACKOFFICE_URL".into(), format!("{url}/RPC2"));
    let address = crate::support::address_of(&format!("{url}/RPC2"));

    let mut exports: Vec<String> = Vec::new();
    let mut run = |block: &[String]| {
        let mut commands = exports.clone();
        commands.extend(block.iter().cloned());
        let ran = run_block(dir.path(), &env, &commands);
        check(&ran);
        exports.extend(
            block
                .iter()
                .filter(|command| command.starts_with("export "))
                .cloned(),
        );
    };
    run(&blocks[0]);

    // Step 1: Ada registers in the browser.
    let mut ada = Visitor::new(address);
    for value in ["ada@example.org", "B1-C2", "B1-C1"] {
        assert!(walk.contains(value), "the README names {value}");
    }
    let registered = crate::web::register(&mut ada, &registration("Ada", "ada@example.org"), None);
    assert_eq!(registered.text_of("cid").as_deref(), Some("B1-C2"));
    // Step 2: she uploads the flat TACA as the editor.
    let module_path = "taca-sdk/examples/target/wasm32-unknown-unknown/release/taca_flat.wasm";
    for value in [
        "`Editor`",
        "`0.25 per use`",
        "maximum price per use `0.25`",
        module_path,
        "`B1-P1`",
        "`B1-P1T`",
    ] {
        assert!(walk.contains(value), "the README names {value}");
    }
    let module = std::fs::read(dir.path().join(module_path)).expect("the first block built it");
    let csrf = ada.get("/products/new").csrf();
    let added = ada.post_multipart(
        "/products/new",
        &[
            ("csrf", &csrf),
            ("name", "Editor"),
            ("terms", "0.25 per use"),
            ("maxPrice", "0.25"),
            ("agrees", "yes"),
        ],
        ("taca", "taca_flat.wasm", &module),
    );
    assert_eq!(
        added.text_of("pid").as_deref(),
        Some("B1-P1"),
        "{}",
        added.body
    );
    assert_eq!(added.text_of("test-pid").as_deref(), Some("B1-P1T"));

    run(&blocks[1]);
    // Ada declares the spell checker a component of her editor.
    assert!(walk.contains("enters `B1-P2` as a component of `B1-P1`"));
    let csrf = ada.get("/account").csrf();
    let saved = ada.post_form(
        "/products/components",
        &[("csrf", &csrf), ("pid", "B1-P1"), ("components", "B1-P2")],
    );
    assert_eq!(saved.status, 200, "{}", saved.body);
    assert!(
        saved.body.contains("The components of B1-P1 are saved."),
        "{}",
        saved.body
    );
    let used_from = crate::support::now_ms();
    run(&blocks[2]);
    run(&blocks[3]);

    // Step 3: Ada sees her balance and the uses in the browser.
    assert!(walk.contains("`EUR 1.50`"));
    assert_eq!(
        ada.get("/account").text_of("balance").as_deref(),
        Some("EUR 1.50")
    );
    // The statement of the month the uses were made in (each month since,
    // in case one ended meanwhile).
    let pages: Vec<String> = crate::support::months_since(used_from)
        .into_iter()
        .map(|month| ada.get(&format!("/statement?month={month}")).body)
        .collect();
    let statement = pages
        .iter()
        .find(|page| page.contains("uses of Editor (B1-P1) at EUR 0.25 each"))
        .unwrap_or_else(|| panic!("uses of Editor (B1-P1) at EUR 0.25 each in {pages:?}"));
    assert!(walk.contains("`Editor (B1-P1)` at `EUR 0.25` each"));
    assert!(statement.contains("id=\"chart\""));
    // What her editor earned: its six uses, and the income axis labelled.
    assert!(statement.contains("id=\"earned-B1-P1\""), "{statement}");
    assert!(statement.contains("id=\"chart-B1-P1\""), "{statement}");
    assert!(statement.contains("EUR per day"), "{statement}");

    // Ctrl-C stops both cleanly; running it again reuses the data.
    let pid = franchise.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = franchise.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the franchise did not stop"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    assert!(
        !dir.path().join("meterd.sock").exists(),
        "the meter removed its socket"
    );
    let (again, url) = run_command(dir.path(), &env);
    assert!(again.first_line.starts_with("franchise: web pages at "));
    let mut ada = Visitor::new(crate::support::address_of(&format!("{url}/RPC2")));
    let token = ada.get("/login").csrf();
    let back = ada.post_form(
        "/login",
        &[
            ("csrf", &token),
            ("who", "ada@example.org"),
            ("password", crate::web::PASSWORD),
        ],
    );
    assert_eq!(back.status, 303, "Ada's registration survived");
    assert_eq!(
        ada.get("/account").text_of("balance").as_deref(),
        Some("EUR 1.50")
    );
}

#[test]
fn the_franchise_says_clearly_when_its_port_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let output = Command::new(workspace_binary("franchise", "franchise"))
        .args(["--data-dir", dir.path().join("data").to_str().unwrap()])
        .args(["--listen", &address])
        .env("XDG_RUNTIME_DIR", dir.path())
        .env("FRANCHISE_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(69), "{output:?}");
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        said.contains(&format!("cannot listen on {address}")) && said.contains("--listen"),
        "{said}"
    );
    assert!(
        !dir.path().join("meterd.sock").exists(),
        "no meter was left running"
    );
}
