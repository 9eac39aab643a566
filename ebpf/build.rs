//! Compiles every `bpf/*.c` with clang (`-O2 -g -target bpf`: BTF for CO-RE and for aya's
//! map definitions) into `$OUT_DIR/<name>.o`, which `src/lib.rs` embeds.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let clang = std::env::var("NETD_BPF_CLANG").unwrap_or_else(|_| "clang".into());
    println!("cargo:rerun-if-env-changed=NETD_BPF_CLANG");
    println!("cargo:rerun-if-changed=bpf");
    let arch_include = format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    let mut sources: Vec<PathBuf> = std::fs::read_dir("bpf")
        .expect("ebpf/bpf")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "c"))
        .collect();
    sources.sort();
    for src in sources {
        println!("cargo:rerun-if-changed={}", src.display());
        let obj = out.join(src.file_stem().unwrap()).with_extension("o");
        let status = Command::new(&clang)
            .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror", "-D__TARGET_ARCH_x86"])
            .arg(format!("-I{arch_include}"))
            .arg("-Ibpf")
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .status()
            .unwrap_or_else(|e| {
                panic!("netd-ebpf: cannot run `{clang}` to compile the BPF programs ({e}); install clang and libbpf-dev (apt-get install -y clang libbpf-dev) or set NETD_BPF_CLANG")
            });
        assert!(status.success(), "netd-ebpf: {clang} failed compiling {}", src.display());
    }
    println!("cargo:rerun-if-changed=bpf/maps.h");
}
