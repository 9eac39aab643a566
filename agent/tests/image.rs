//! The image agrees with the DaemonSet and with netd: `deploy/image/build.sh` (`make image`) and
//! `deploy/image/Containerfile` (other tools) put the binaries where `deploy/kubernetes/netd.yaml`
//! runs them, give the init container the shell commands it uses, install the same runtime
//! packages, and `make image` runs every program netd executes. File checks only: `make image`
//! itself (it downloads Debian packages) proves the built image complete.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    let p = root().join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The value of a top-level `NAME="value"` (or `'value'`) assignment in build.sh.
fn script_var(script: &str, name: &str) -> String {
    let prefix = format!("{name}=");
    let line = script.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("build.sh assigns no {name}"));
    line[prefix.len()..].trim_matches(['"', '\'']).to_string()
}

fn words(s: &str) -> BTreeSet<String> {
    s.split_whitespace().map(String::from).collect()
}

/// The DaemonSet's pod spec.
fn daemonset_pod() -> serde_yaml::Value {
    let text = read("deploy/kubernetes/netd.yaml");
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect();
    let ds = docs.into_iter().find(|d| d["kind"] == "DaemonSet").expect("a DaemonSet");
    ds["spec"]["template"]["spec"].clone()
}

fn strings(v: &serde_yaml::Value) -> Vec<String> {
    v.as_sequence().unwrap_or_else(|| panic!("not a list: {v:?}")).iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

/// The Containerfile's last stage (the image), with `\` continuations joined into single lines.
fn runtime_stage(containerfile: &str) -> Vec<String> {
    let joined = containerfile.lines().filter(|l| !l.trim_start().starts_with('#')).collect::<Vec<_>>().join("\n").replace("\\\n", " ");
    let lines: Vec<String> = joined.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect();
    let last_from = lines.iter().rposition(|l| l.starts_with("FROM ")).expect("a FROM");
    lines[last_from..].to_vec()
}

/// The packages an `apt-get install` in these lines installs.
fn apt_installs(lines: &[String]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for l in lines {
        if let Some((_, rest)) = l.split_once("apt-get install") {
            let args = rest.split("&&").next().unwrap();
            out.extend(args.split_whitespace().filter(|w| !w.starts_with('-')).map(String::from));
        }
    }
    out
}

fn instruction_json(lines: &[String], name: &str) -> serde_json::Value {
    let l = lines.iter().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("the image stage has no {name}"));
    serde_json::from_str(&l[name.len() + 1..]).unwrap_or_else(|e| panic!("{name} is not exec (JSON) form: {e}"))
}

#[test]
fn image_layout_serves_the_daemonset() {
    let script = read("deploy/image/build.sh");
    let pod = daemonset_pod();
    let bin_dir = script_var(&script, "BIN_DIR");
    let installed: BTreeSet<String> = words(&script_var(&script, "BINARIES")).iter().map(|b| format!("{bin_dir}/{b}")).collect();
    let applets = words(&script_var(&script, "SHELL_APPLETS"));

    // Both containers run the image make image builds, of this version.
    let image = format!("{}:{}", script_var(&script, "NAME"), env!("CARGO_PKG_VERSION"));
    let containers: Vec<&serde_yaml::Value> = pod["containers"].as_sequence().unwrap().iter().chain(pod["initContainers"].as_sequence().unwrap()).collect();
    for c in &containers {
        assert_eq!(c["image"].as_str(), Some(image.as_str()), "container {:?}", c["name"]);
    }

    // netd's container runs exactly the image's entrypoint and command, a binary the image has.
    let netd = &pod["containers"][0];
    let command = strings(&netd["command"]);
    assert!(installed.contains(&command[0]), "{} is not in the image ({installed:?})", command[0]);
    let entrypoint: Vec<String> = serde_json::from_str(&script_var(&script, "ENTRYPOINT")).unwrap();
    let cmd: Vec<String> = serde_json::from_str(&script_var(&script, "CMD")).unwrap();
    assert_eq!(command, entrypoint);
    assert_eq!(strings(&netd["args"]), cmd);

    // The init container: /bin/sh -c 'cp ... && mv ... && if [ ...; then cp ...; fi': the shell
    // and each command are linked (busybox applets in /usr/bin, which merged /usr makes /bin),
    // the binaries and CNI plugins it copies are there.
    let init = strings(&pod["initContainers"][0]["command"]);
    let shell = init[0].strip_prefix("/bin/").unwrap_or_else(|| panic!("init shell {} is not in /bin", init[0]));
    assert!(applets.contains(shell), "the image has no {shell} ({applets:?})");
    assert_eq!(init[1], "-c");
    for step in init[2].split("&&").flat_map(|s| s.split("||")).flat_map(|s| s.split(';')) {
        let mut words = step.split_whitespace().skip_while(|w| ["if", "then", "else", "fi", "!"].contains(w));
        let Some(program) = words.next() else { continue };
        assert!(applets.contains(program), "the init container runs {program}, which the image does not have ({applets:?})");
    }
    let plugin_dir = script_var(&script, "CNI_PLUGIN_DIR");
    let plugins: BTreeSet<String> = words(&script_var(&script, "CNI_PLUGINS")).iter().map(|p| format!("{plugin_dir}/{p}")).collect();
    let copied: Vec<&str> = init[2].split_whitespace().filter(|w| w.starts_with(&format!("{bin_dir}/")) || w.starts_with(&format!("{plugin_dir}/"))).collect();
    assert!(!copied.is_empty(), "the init container copies nothing from {bin_dir}");
    for path in &copied {
        assert!(installed.contains(*path) || plugins.contains(*path), "the init container copies {path}, which the image does not have");
    }
    // Every plugin the conflist netd writes chains is installed (netd-cni from the binaries).
    let conf = netd::cniconf::CniConf {
        subnet_file: "/run/netd/subnet.env".into(),
        data_dir: "/var/lib/netd".into(),
        bridge: "netd0".into(),
        nameserver: None,
        cluster_domain: "cluster.local".into(),
        host_local_dirs: Vec::new(),
    };
    let conflist: serde_json::Value = serde_json::from_str(&conf.render()).unwrap();
    for plugin in conflist["plugins"].as_array().unwrap() {
        let ty = plugin["type"].as_str().unwrap();
        assert!(copied.iter().any(|c| c.ends_with(&format!("/{ty}"))), "the conflist chains {ty}, which the init container does not install ({copied:?})");
    }

    // The Containerfile makes the same image: the same binaries in the same place, the same
    // entrypoint and command, the same runtime packages (its base has a shell, cp and mv).
    let stage = runtime_stage(&read("deploy/image/Containerfile"));
    let copy = stage.iter().find(|l| l.starts_with("COPY --from=")).expect("the image stage copies the binaries");
    let args: Vec<&str> = copy.split_whitespace().skip(2).collect();
    let (dest, sources) = args.split_last().unwrap();
    let copied: BTreeSet<String> = sources.iter().map(|s| format!("{}/{}", dest.trim_end_matches('/'), s.rsplit('/').next().unwrap())).collect();
    assert_eq!(copied, installed, "the Containerfile installs {copied:?}, build.sh {installed:?}");
    assert_eq!(instruction_json(&stage, "ENTRYPOINT"), serde_json::json!(entrypoint));
    assert_eq!(instruction_json(&stage, "CMD"), serde_json::json!(cmd));
    assert_eq!(apt_installs(&stage), words(&script_var(&script, "RUNTIME_PACKAGES")), "Containerfile and build.sh install different runtime packages");

    // The build stage installs only packages `make deps` knows (the Makefile's DEB_PACKAGES).
    let makefile = read("Makefile");
    let deb_packages = makefile.split("DEB_PACKAGES :=").nth(1).unwrap().split("\n\n").next().unwrap().replace('\\', " ");
    let known = words(&deb_packages);
    let containerfile = read("deploy/image/Containerfile");
    let builder: Vec<String> = containerfile.split("\nFROM ").nth(1).unwrap().replace("\\\n", " ").lines().map(String::from).collect();
    let build_deps = apt_installs(&builder);
    assert!(!build_deps.is_empty());
    assert!(build_deps.is_subset(&known), "the Containerfile's build stage installs {:?}, which make deps does not", build_deps.difference(&known).collect::<Vec<_>>());
}

/// Every `Command::new("program")` in netd's non-test sources (the test modules close each file).
fn programs_in_sources() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for dir in ["agent/src", "agent/proxy/src", "agent/kube/src", "agent/udp/src", "agent/common/src", "dns/src", "ebpf/src"] {
        let mut stack = vec![root().join(dir)];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|x| x == "rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    let code = text.split("#[cfg(test)]").next().unwrap();
                    for (_, rest) in code.match_indices("Command::new(\"").map(|(i, m)| (i, &code[i + m.len()..])) {
                        out.insert(rest[..rest.find('"').unwrap()].to_string());
                    }
                }
            }
        }
    }
    out
}

#[test]
fn make_image_checks_every_program_netd_runs() {
    let script = read("deploy/image/build.sh");
    let checked = words(&script_var(&script, "EXECS"));
    let mut runs = programs_in_sources();
    assert!(runs.contains("nft") && runs.contains("conntrack"), "the source scan found {runs:?}");
    // iptables mode runs the configured iptables-restore (default below) and its -save.
    let restore = netd_proxy::ProxyConfig::new(netd_proxy::NodeInfo::default(), netd_proxy::ProxyMode::Iptables).iptables_restore;
    runs.insert(restore.replace("-restore", "-save"));
    runs.insert(restore);
    let unchecked: Vec<&String> = runs.difference(&checked).collect();
    assert!(unchecked.is_empty(), "netd runs {unchecked:?}: add them to EXECS in deploy/image/build.sh (and their packages to RUNTIME_PACKAGES)");
}
