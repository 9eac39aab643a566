//! The fake API server as a process, for end-to-end tests that run netd against it (for
//! example inside a network namespace of the test bed):
//!
//! ```text
//! cargo run -p netd-kube --features testserver --example fake-apiserver -- \
//!     --listen 127.0.0.1:6443 --kubeconfig-out /tmp/kubeconfig \
//!     agent/kube/testdata/services.json agent/kube/testdata/endpointslices.json
//! ```
//!
//! It loads the given JSON files (objects or lists), writes a kubeconfig pointing at itself,
//! prints `listening <addr>`, then takes one command per line on stdin and answers `ok …` or
//! `error …` on stdout:
//!
//! ```text
//! load <file>                        create/replace the objects in a JSON file
//! delete <kind> <namespace|-> <name> delete an object (kind: node, service, endpointslice)
//! compact                            forget history: watches from older versions get 410
//! expire                             send every open watch a 410 ERROR event and end it
//! close                              end every open watch (as at its timeout)
//! bookmark                           BOOKMARK to every watch that allows them
//! gone http|event                    how a watch from a compacted version is refused
//! stop | start                       stop answering (connections refused) / answer again
//! rv                                 print the current resourceVersion
//! watches                            print the open watches
//! ```
//!
//! It exits when stdin closes.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use netd_kube::testserver::{FakeApiServer, GoneMode, Kind};

#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Where to write a kubeconfig pointing at the server.
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
    /// JSON files to load (objects or lists).
    files: Vec<PathBuf>,
}

fn load(server: &FakeApiServer, path: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    server.load(&text).map(|rv| format!("resourceVersion {rv}"))
}

async fn command(server: &FakeApiServer, line: &str) -> Result<String, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["load", path] => load(server, path),
        ["delete", kind, ns, name] => {
            let kind: Kind = kind.parse()?;
            let ns = if *ns == "-" { "" } else { ns };
            server.delete(kind, ns, name).map(|rv| format!("resourceVersion {rv}")).ok_or_else(|| "no such object".to_string())
        }
        ["compact"] => {
            server.compact();
            Ok(format!("compacted at {}", server.resource_version()))
        }
        ["expire"] => {
            server.expire_watches();
            Ok(String::new())
        }
        ["close"] => {
            server.close_watches();
            Ok(String::new())
        }
        ["bookmark"] => {
            server.bookmark();
            Ok(String::new())
        }
        ["gone", "http"] => {
            server.set_gone_mode(GoneMode::HttpError);
            Ok(String::new())
        }
        ["gone", "event"] => {
            server.set_gone_mode(GoneMode::ErrorEvent);
            Ok(String::new())
        }
        ["stop"] => {
            server.stop().await;
            Ok(String::new())
        }
        ["start"] => server.restart().await.map(|_| String::new()).map_err(|e| e.to_string()),
        ["rv"] => Ok(server.resource_version().to_string()),
        ["watches"] => Ok(format!("{:?}", server.open_watches())),
        [] => Ok(String::new()),
        _ => Err(format!("unknown command {line:?}")),
    }
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args = Args::parse();
    let server = FakeApiServer::start_on(args.listen).await.map_err(|e| format!("listen on {}: {e}", args.listen))?;
    for f in &args.files {
        load(&server, &f.to_string_lossy())?;
    }
    if let Some(path) = &args.kubeconfig_out {
        std::fs::write(path, server.kubeconfig()).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    println!("listening {}", server.addr());

    // stdin is read on a plain thread (blocking reads), commands run here.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = rx.recv().await {
        match command(&server, line.trim()).await {
            Ok(msg) if msg.is_empty() => println!("ok"),
            Ok(msg) => println!("ok {msg}"),
            Err(e) => println!("error {e}"),
        }
    }
    Ok(())
}
