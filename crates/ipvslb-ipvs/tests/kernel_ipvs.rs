//! Kernel tests: real IPVS in the test VM (`cargo xtask vm-test`), with `ipvsadm` as a witness.

use std::process::Command;

#[test]
fn ipvsadm_lists_what_it_added() {
    let out = Command::new("ipvsadm")
        .args(["-A", "-t", "10.0.0.1:80", "-s", "rr"])
        .output()
        .expect("ipvsadm runs");
    assert!(out.status.success(), "{out:?}");
    let list = Command::new("ipvsadm").args(["-L", "-n"]).output().unwrap();
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains("10.0.0.1:80"), "{text}");
}
