//! The quickstart works with no server: it creates the demo, fills every
//! hole it can, and leaves the rows it cannot fill alone. Running it again
//! starts afresh.

use std::process::Command;

#[test]
fn quickstart_fills_the_demo() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    for round in 0..2 {
        let out = Command::new(env!("CARGO_BIN_EXE_infill"))
            .args(["quickstart", "--dir", demo.to_str().unwrap()])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "round {round}\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("with 50000 answers"), "{stdout}");
        assert!(stdout.contains("done: job fill_syllabus wrote 8,333 rows"), "{stdout}");
        assert!(
            stdout.contains("Now 0 answers lack a syllabus their cohort has (was 8333)"),
            "{stdout}"
        );
        assert!(stdout.contains("Try next:"), "{stdout}");
        // One run's audit log: the demo is re-created each time.
        assert_eq!(std::fs::read_dir(demo.join("infill_logs")).unwrap().count(), 1);
    }
    assert!(demo.join("infill.toml").exists());
    // The spec it wrote is a working spec: a dry run finds nothing left to do.
    let out = Command::new(env!("CARGO_BIN_EXE_infill"))
        .args(["run", demo.join("infill.toml").to_str().unwrap(), "--dry-run", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["candidates"], 0);
    assert_eq!(report["keys_in_range"], 50000);
}
