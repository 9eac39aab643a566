use std::process::ExitCode;

use clap::Parser;
use netd::cli::{Cli, Command};

/// `netd status`: exit 0 healthy, 1 degraded, 2 unhealthy, 3 when netd cannot be reached.
async fn status(args: netd::cli::StatusArgs) -> i32 {
    use std::io::IsTerminal;
    let sock = args.run_dir.join("netd.sock");
    match netd::server::fetch_status(&sock).await {
        Ok(s) => {
            let (health, _) = netd::status::verdict(&s);
            if args.json {
                let (h, reasons) = netd::status::verdict(&s);
                let v = serde_json::json!({ "health": h, "reasons": reasons, "status": s });
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                print!("{}", netd::status::render(&s, std::io::stdout().is_terminal()));
            }
            health.exit_code()
        }
        Err(e) => {
            let why = if e.kind() == std::io::ErrorKind::NotFound || e.kind() == std::io::ErrorKind::ConnectionRefused {
                format!("netd is not running on this node (nothing listens on {})", sock.display())
            } else {
                format!("cannot read netd's status from {}: {e}", sock.display())
            };
            if args.json {
                println!("{}", serde_json::json!({ "health": "unreachable", "reasons": [why] }));
            } else {
                println!("UNREACHABLE  {why}");
            }
            3
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    netd::logging::init(cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, the message once. Our errors carry their causes in their own message
            // (each crate's convention), so walking `source()` as anyhow's report does would
            // say them again ("Caused by: ..."), sometimes in the library's rawer words.
            eprintln!("netd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    match cli.command {
        Command::Run(args) => rt.block_on(netd::daemon::run(*args))?,
        Command::Status(args) => {
            let code = rt.block_on(status(args));
            std::process::exit(code);
        }
        Command::Services(cmd) => rt.block_on(netd_proxy::registry::cli::run_cli(cmd))?,
        Command::Cleanup(args) => {
            let dirs = netd::cleanup::Dirs {
                run_dir: &args.run_dir,
                state_dir: &args.state_dir,
                cni_conf_dir: non_empty(&args.cni_conf_dir),
                cni_bin_dir: non_empty(&args.cni_bin_dir),
                bpffs: &args.ebpf_bpffs,
            };
            let r = rt.block_on(netd::cleanup::cleanup(&dirs, &args.cni_bridge, args.dry_run))?;
            if args.dry_run {
                println!("would remove {} object(s) (nothing removed):", r.objects().len());
                for o in r.objects() {
                    println!("  {o}");
                }
                return Ok(());
            }
            println!(
                "removed: links [{}], {} route(s), nftables table: {}, udp eBPF fast path: {}, eBPF service dataplane: {}, eBPF pins [{}], service rules [{}], lo addresses [{}], files [{}]",
                r.links.join(", "),
                r.routes.len(),
                if r.nft_table { "yes" } else { "absent" },
                if r.udp_fast_path { "yes" } else { "absent" },
                if r.ebpf_services { "yes" } else { "absent" },
                r.pins.join(", "),
                r.service_rules.join(", "),
                r.lo_addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", "),
                r.files.join(", ")
            );
            println!("the subnet lease in etcd is left to expire (24 h) or can be deleted by hand");
        }
    }
    Ok(())
}

/// A directory flag, `None` when given as "" (the operator's way to say "none").
fn non_empty(p: &std::path::Path) -> Option<&std::path::Path> {
    (!p.as_os_str().is_empty()).then_some(p)
}
