//! The Vagrantfile is valid (`vagrant validate`, provider options ignored: no VirtualBox
//! here) and provisions the VM with the same setup scripts the tests use.

use std::path::Path;
use std::process::Command;

#[test]
fn vagrantfile_validates_and_uses_the_test_setup_scripts() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let text = std::fs::read_to_string(root.join("Vagrantfile")).expect("Vagrantfile at the repository root");
    for script in ["scripts/setup.sh", "scripts/setup-docker.sh"] {
        assert!(text.contains(&format!("path: \"{script}\"")), "the Vagrantfile does not provision with {script}");
        assert!(root.join(script).is_file(), "{script} is missing");
    }
    assert!(text.contains("guest: BROKER_PORT, host: BROKER_PORT") && text.contains("BROKER_PORT = 5672"), "broker port 5672 is not forwarded");
    let out = Command::new("vagrant")
        .args(["validate", "--ignore-provider"])
        .current_dir(root)
        .env("VAGRANT_CHECKPOINT_DISABLE", "1")
        .output()
        .expect("vagrant is not installed: run scripts/setup-vagrant.sh");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("validated successfully"), "vagrant validate failed:\n{text}");
}
