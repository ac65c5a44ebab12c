use super::*;

fn parse(text: &str) -> Result<Spec> {
    Spec::parse(PathBuf::from("/specs/infill.toml"), text.to_string())
}

const GOOD: &str = r#"
[databases]
target = "sqlite:demo.db"

[defaults]
batch_size = 500

[jobs.fill]
source.table = "public.runs"
source.key = "id"
source.where = "activity_id IS NULL AND block_id = :block"
action.update.activity_id = "(SELECT a.id FROM activities a WHERE a.run_id = runs.id)"
params.block = { type = "int" }
"#;

#[test]
fn a_good_spec_becomes_a_typed_job() {
    let spec = parse(GOOD).unwrap();
    let job = &spec.jobs["fill"];
    assert_eq!(job.table, ["public", "runs"]);
    assert_eq!(job.key, ["id"]);
    assert_eq!(job.updates[0].0, "activity_id");
    assert_eq!(job.filter.as_ref().unwrap().location.line, 11);
    assert!(job.undo);
    let r = spec
        .resolve(
            "fill",
            &Overrides {
                params: vec![("block".into(), "7".into())],
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(r.params["block"], Value::Int(7));
    assert_eq!(r.settings.batch_size, 500);
    assert_eq!(r.target.expose(), "sqlite:///specs/demo.db");
}

#[test]
fn definition_hash_ignores_throttle_but_not_sql() {
    let a = parse(GOOD).unwrap().jobs["fill"].definition_sha256.clone();
    let b = parse(&GOOD.replace("batch_size = 500", "batch_size = 900"))
        .unwrap()
        .jobs["fill"]
        .definition_sha256
        .clone();
    let c = parse(&GOOD.replace("block_id = :block", "block_id >= :block"))
        .unwrap()
        .jobs["fill"]
        .definition_sha256
        .clone();
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn a_missing_param_is_a_usage_error() {
    let spec = parse(GOOD).unwrap();
    let e = spec.resolve("fill", &Overrides::default()).unwrap_err();
    assert!(e.to_string().contains("needs --param block=<int>"), "{e}");
    let e = spec
        .resolve(
            "fill",
            &Overrides {
                params: vec![("block".into(), "seven".into())],
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("`seven` is not an int"), "{e}");
}

#[test]
fn errors_point_at_line_and_field() {
    let e = parse(&GOOD.replace("source.key = \"id\"", "source.kee = \"id\"")).unwrap_err();
    let s = e.to_string();
    assert!(s.starts_with("/specs/infill.toml:10:"), "{s}");
    assert!(s.contains("jobs.fill.source.kee"), "{s}");
    assert!(s.contains("unknown field"), "{s}");
}

#[test]
fn undeclared_param_is_named() {
    let e = parse(&GOOD.replace("params.block = { type = \"int\" }", "")).unwrap_err();
    let s = e.to_string();
    assert!(s.contains("/specs/infill.toml:11:"), "{s}");
    assert!(s.contains("jobs.fill.source.where: uses :block"), "{s}");
}

#[test]
fn cycles_are_named() {
    let text = format!(
        "{GOOD}depends_on = [\"other\"]\n[jobs.other]\nsource.table = \"t\"\nsource.key = \"id\"\naction.update.x = \"1\"\ndepends_on = [\"fill\"]\n"
    );
    let e = parse(&text).unwrap_err();
    assert!(
        e.to_string().contains("dependency cycle: fill -> other -> fill")
            || e.to_string().contains("dependency cycle: other -> fill -> other"),
        "{e}"
    );
}

#[test]
fn field_at_finds_header_and_key() {
    let text = "[jobs.a]\nsource.table = 5\n";
    assert_eq!(field_at(text, text.find('5').unwrap()), "jobs.a.source.table");
}

#[test]
fn busy_sleep_coef_is_checked_layered_and_live() {
    let spec = parse(GOOD).unwrap();
    let params = Overrides {
        params: vec![("block".into(), "7".into())],
        ..Default::default()
    };
    assert_eq!(spec.resolve("fill", &params).unwrap().settings.busy_sleep_coef, 2.0);

    let layered = parse(&GOOD.replace("batch_size = 500", "busy_sleep_coef = 4.0").replace(
        "params.block = { type = \"int\" }",
        "params.block = { type = \"int\" }\nbusy_sleep_coef = 0.5",
    ))
    .unwrap();
    let mut s = layered.resolve("fill", &params).unwrap().settings;
    assert_eq!(s.busy_sleep_coef, 0.5, "the job's value wins over [defaults]");

    let e = parse(&GOOD.replace("batch_size = 500", "busy_sleep_coef = -1.0"))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("/specs/infill.toml:6:"), "{e}");
    assert!(
        e.contains("defaults.busy_sleep_coef: must be a number, 0 or more"),
        "{e}"
    );

    assert!(Settings::LIVE_KEYS.contains(&"busy_sleep_coef"));
    s.apply("busy_sleep_coef", "0").unwrap();
    assert_eq!(s.busy_sleep_coef, 0.0);
    assert!(s.apply("busy_sleep_coef", "-2").is_err());
    assert_eq!(s.sleep_coef, 0.0, "sleep_coef untouched");
}

#[test]
fn concurrency_is_live() {
    let mut s = Settings::default_for_checks();
    assert_eq!(s.concurrency, 1);
    assert!(Settings::LIVE_KEYS.contains(&"concurrency"));
    s.apply("concurrency", "3").unwrap();
    assert_eq!(s.concurrency, 3);
    for bad in ["0", "-1", "two"] {
        let e = s.apply("concurrency", bad).unwrap_err();
        assert!(e.contains("not a positive whole number"), "{e}");
    }
    assert_eq!(s.concurrency, 3, "a refused value changes nothing");
}
