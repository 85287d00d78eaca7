//! The container recipe (`Dockerfile`, README "Running it as a service"),
//! checked without a container runtime: CI machines and this one have no
//! Docker daemon, so the image itself is not built here. What can go wrong
//! in it without Docker noticing until a user runs it is checked against
//! the real binary: the flags of its CMD (a renamed flag would make the
//! container exit at once), its HEALTHCHECK script (bash talking HTTP to
//! `/healthz` through `/dev/tcp`), the ports it exposes, and that it runs
//! as the unprivileged user it creates, from a two-stage build.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{run_bounded, unused_port, Broker, TempDir};

/// The Dockerfile's instructions: keyword and the rest, continuation lines
/// joined, comments dropped.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (keyword, rest) = current.split_once(' ').unwrap_or((&current, ""));
                out.push((keyword.to_uppercase(), rest.trim().to_string()));
                current.clear();
            }
        }
    }
    out
}

/// The strings of an exec-form array (`["a", "b \"c\""]`).
fn exec_form(s: &str) -> Vec<String> {
    let s = s.trim();
    assert!(s.starts_with('[') && s.ends_with(']'), "not exec form: {s}");
    let mut items = Vec::new();
    let mut chars = s[1..s.len() - 1].chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            continue; // separators
        }
        let mut item = String::new();
        loop {
            match chars.next().expect("unterminated string") {
                '"' => break,
                '\\' => item.push(chars.next().expect("escape at the end")),
                c => item.push(c),
            }
        }
        items.push(item);
    }
    items
}

fn the(ins: &[(String, String)], keyword: &str) -> Vec<String> {
    ins.iter()
        .filter(|(k, _)| k == keyword)
        .map(|(_, rest)| rest.clone())
        .collect()
}

#[test]
fn the_dockerfile_runs_the_real_binary_as_written() {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile"))
        .expect("Dockerfile at the repository root");
    let ins = instructions(&text);

    // Two stages; the run stage copies the binary out of the build stage
    // to where ENTRYPOINT runs it.
    let froms = the(&ins, "FROM");
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(froms[0].ends_with(" AS build"), "{froms:?}");
    let entrypoint = exec_form(&the(&ins, "ENTRYPOINT")[0]);
    assert_eq!(entrypoint.len(), 1, "{entrypoint:?}");
    let copied = the(&ins, "COPY");
    assert!(
        copied
            .iter()
            .any(|c| c.starts_with("--from=build ") && c.ends_with(&entrypoint[0])),
        "{copied:?}"
    );

    // What the build stage installs is what the run stage copies.
    let build_runs = ins
        .iter()
        .take_while(|(k, r)| !(k == "FROM" && r == &froms[1]))
        .filter(|(k, _)| k == "RUN")
        .map(|(_, r)| r.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    let copy = copied
        .iter()
        .find(|c| c.starts_with("--from=build "))
        .expect("a COPY --from=build");
    let source = copy
        .split_whitespace()
        .nth(1)
        .expect("COPY --from=build SRC DST");
    assert!(
        build_runs.contains(&format!("target/release/coremq {source}")),
        "the build stage installs {source}: {build_runs}"
    );

    // Not root: the run stage's USER (after its FROM) is the one a RUN
    // creates, with the fixed uid the comments promise for chowning a
    // bind-mounted data dir.
    let last_from = ins.iter().rposition(|(k, _)| k == "FROM").expect("FROM");
    let user: Vec<&str> = ins[last_from..]
        .iter()
        .filter(|(k, _)| k == "USER")
        .map(|(_, r)| r.as_str())
        .collect();
    assert_eq!(user, ["coremq:coremq"]);
    assert!(
        !ins[..last_from].iter().any(|(k, _)| k == "USER"),
        "a USER in the build stage says nothing of the image's"
    );
    let runs = the(&ins, "RUN").join("\n");
    assert!(
        runs.contains("useradd --system --uid 10001 --gid coremq"),
        "{runs}"
    );
    assert!(
        runs.contains("-o coremq -g coremq /var/lib/coremq"),
        "{runs}"
    );

    // CMD, on loopback ports and a scratch data dir: the broker starts
    // with exactly these flags (Broker::start gives its own --listen).
    let cmd = exec_form(&the(&ins, "CMD")[0]);
    let exposed: Vec<String> = the(&ins, "EXPOSE")
        .iter()
        .flat_map(|e| e.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .collect();
    let dir = TempDir::new("container");
    let metrics_port = unused_port();
    let mut args = Vec::new();
    let mut i = 0;
    while i < cmd.len() {
        let (flag, value) = (&cmd[i], cmd.get(i + 1).expect("every CMD flag has a value"));
        let port = value.rsplit_once(':').map(|(_, p)| p);
        if let Some(port) = port.filter(|_| flag.ends_with("listen")) {
            assert!(
                exposed.iter().any(|e| e == port),
                "{flag} {value}: EXPOSE {exposed:?}"
            );
        }
        match flag.as_str() {
            "--listen" => {
                // Broker::start gives its own loopback --listen; the
                // image's must at least be an address.
                value
                    .parse::<std::net::SocketAddr>()
                    .unwrap_or_else(|e| panic!("--listen {value}: {e}"));
            }
            "--data-dir" => {
                assert_eq!(value, "/var/lib/coremq", "the VOLUME");
                args.extend([flag.clone(), dir.0.display().to_string()]);
            }
            "--metrics-listen" => {
                assert!(
                    value.ends_with(":9183"),
                    "the HEALTHCHECK asks 9183: {value}"
                );
                args.extend([flag.clone(), format!("127.0.0.1:{metrics_port}")]);
            }
            _ => args.extend([flag.clone(), value.clone()]),
        }
        i += 2;
    }
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let broker = Broker::start(&arg_refs);

    // The HEALTHCHECK's own command, pointed at this broker's metrics port:
    // healthy; pointed at a port nobody serves: unhealthy.
    let health = the(&ins, "HEALTHCHECK");
    let (_, check) = health[0]
        .split_once(" CMD ")
        .expect("HEALTHCHECK ... CMD [...]");
    let check = exec_form(check);
    assert!(check[2].contains("/dev/tcp/127.0.0.1/9183"), "{check:?}");
    let run_check = |port: u16| {
        let script = check[2].replace("/127.0.0.1/9183", &format!("/127.0.0.1/{port}"));
        run_bounded(
            Command::new(&check[0]).args(&check[1..2]).arg(script),
            Duration::from_secs(10),
        )
    };
    let (code, out, err) = run_check(metrics_port);
    assert_eq!(code, Some(0), "healthy broker: {out}{err}");
    let (code, _, _) = run_check(unused_port());
    assert_ne!(code, Some(0), "nothing on the port must be unhealthy");
    drop(broker);
    println!("Dockerfile: 2 stages, USER coremq:coremq, CMD {cmd:?} started, HEALTHCHECK 0 then non-zero");
}
