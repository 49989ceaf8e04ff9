//! The manifest corpus: every file under `corpus/rejected/` must be refused with a
//! rejection naming the offending field, while the valid documents beside the bad ones
//! are still accepted; every file under `corpus/accepted/` must be accepted whole.
//!
//! Header comments at the top of a file state the expectations:
//! - `# expect-field: spec.rules[0].from[0].source.ipBlocks[1]` (repeatable): some
//!   document of the file is rejected with exactly this field (`<document>` for the
//!   document as a whole);
//! - `# expect-reason: text` (repeatable): some rejection's reason contains `text`;
//! - `# expect-accepted: N`: exactly N documents are accepted (default 0 in
//!   `rejected/`; every non-ignored document in `accepted/`);
//! - `# expect-ignored: N`: exactly N documents are ignored (default 0);
//! - `# expect-enforced: allow-nothing | deny-all | deny-rules | strict | none`: what a
//!   rejected security policy is enforced as (fail closed);
//! - `# expect-warning: field` (repeatable): an accepted document warns about `field`.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

use std::{fs, path::Path};

use ambit_controller::{
    model::{
        authz::{AuthzAction, AuthzPolicy},
        peer_authn::MtlsMode,
    },
    validate::{ModelObject, Outcome, Validated, ValidationContext, validate_file},
};

#[derive(Default)]
struct Expectations {
    fields: Vec<String>,
    reasons: Vec<String>,
    accepted: Option<usize>,
    ignored: Option<usize>,
    enforced: Option<String>,
    warnings: Vec<String>,
}

fn expectations(text: &str) -> Expectations {
    let mut e = Expectations::default();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# expect-") else {
            continue;
        };
        let Some((key, value)) = rest.split_once(':') else {
            continue;
        };
        let value = value.trim().to_owned();
        match key {
            "field" => e.fields.push(value),
            "reason" => e.reasons.push(value),
            "accepted" => e.accepted = Some(value.parse().expect("expect-accepted: a number")),
            "ignored" => e.ignored = Some(value.parse().expect("expect-ignored: a number")),
            "enforced" => e.enforced = Some(value),
            "warning" => e.warnings.push(value),
            other => panic!("unknown expectation `expect-{other}`"),
        }
    }
    e
}

fn corpus_files(dir: &str) -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(dir);
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    files
}

fn enforced_shape(v: &Validated) -> Option<String> {
    let Outcome::Rejected { fail_closed, .. } = &v.outcome else {
        return None;
    };
    Some(match fail_closed {
        None => "none".into(),
        Some(ModelObject::Authz(AuthzPolicy { action, rules, .. })) => {
            match (action, rules.as_slice()) {
                (AuthzAction::Allow, []) => "allow-nothing".into(),
                (AuthzAction::Deny, [r]) if *r == Default::default() => "deny-all".into(),
                (AuthzAction::Deny, _) => "deny-rules".into(),
                (a, _) => format!("unexpected {a:?} stand-in"),
            }
        }
        Some(ModelObject::PeerAuthn(p))
            if p.mode == Some(MtlsMode::Strict) && p.port_modes.is_empty() =>
        {
            "strict".into()
        }
        Some(other) => format!("unexpected stand-in {other:?}"),
    })
}

fn check_file(path: &Path, rejected_dir: bool, failures: &mut Vec<String>) {
    let text = fs::read_to_string(path).unwrap();
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let exp = expectations(&text);
    let results = validate_file(&name, &text, &ValidationContext::default());
    let mut fail = |msg: String| failures.push(format!("{name}: {msg}"));
    if results.is_empty() {
        fail("no documents".into());
        return;
    }
    let accepted = results.iter().filter(|(_, v)| v.is_accepted()).count();
    let ignored = results
        .iter()
        .filter(|(_, v)| matches!(v.outcome, Outcome::Ignored { .. }))
        .count();
    let rejections: Vec<_> = results.iter().flat_map(|(_, v)| v.rejections()).collect();
    let all_warnings: Vec<_> = results.iter().flat_map(|(_, v)| v.warnings()).collect();

    if rejected_dir && exp.fields.is_empty() {
        fail("a rejected-corpus file must state `# expect-field:`".into());
    }
    for f in &exp.fields {
        if !rejections.iter().any(|r| r.field.to_string() == *f) {
            let got: Vec<String> = rejections
                .iter()
                .map(|r| format!("{} ({})", r.field, r.reason))
                .collect();
            fail(format!("no rejection at field `{f}`; got: {got:?}"));
        }
    }
    for r in &exp.reasons {
        if !rejections.iter().any(|x| x.reason.contains(r.as_str())) {
            let got: Vec<&str> = rejections.iter().map(|x| x.reason.as_str()).collect();
            fail(format!("no rejection reason contains `{r}`; got: {got:?}"));
        }
    }
    let want_ignored = exp.ignored.unwrap_or(0);
    if ignored != want_ignored {
        fail(format!(
            "{ignored} documents ignored, expected {want_ignored}"
        ));
    }
    let want_accepted = exp.accepted.unwrap_or(if rejected_dir {
        0
    } else {
        results.len() - want_ignored
    });
    if accepted != want_accepted {
        let summary: Vec<String> = results
            .iter()
            .map(|(_, v)| {
                let e = v.status_entry();
                format!("{:?} {:?}: {} {}", e.kind, e.name, e.status, e.reason)
            })
            .collect();
        fail(format!(
            "{accepted} documents accepted, expected {want_accepted}: {summary:#?}"
        ));
    }
    if !rejected_dir && !rejections.is_empty() {
        fail(format!("unexpected rejections: {rejections:#?}"));
    }
    if let Some(shape) = &exp.enforced {
        let shapes: Vec<String> = results
            .iter()
            .filter_map(|(_, v)| enforced_shape(v))
            .collect();
        if !shapes.contains(shape) {
            fail(format!(
                "no rejected document enforced as `{shape}`; got {shapes:?}"
            ));
        }
    }
    for w in &exp.warnings {
        if !all_warnings.iter().any(|x| x.field.to_string() == *w) {
            let got: Vec<String> = all_warnings.iter().map(ToString::to_string).collect();
            fail(format!("no warning at field `{w}`; got {got:?}"));
        }
    }
    // Every rejection names its object as far as the document allows, and says why.
    for r in &rejections {
        if r.reason.trim().is_empty() {
            fail(format!("empty reason at {}", r.field));
        }
        if r.origin.is_none() {
            fail(format!("rejection at {} has no origin", r.field));
        }
    }
}

#[test]
fn rejected_corpus_names_the_offending_field() {
    let files = corpus_files("rejected");
    assert!(
        files.len() >= 30,
        "the rejected corpus has {} files, want at least 30",
        files.len()
    );
    let mut failures = Vec::new();
    for f in &files {
        check_file(f, true, &mut failures);
    }
    assert!(
        failures.is_empty(),
        "{} corpus failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn accepted_corpus_is_accepted() {
    let files = corpus_files("accepted");
    assert!(!files.is_empty());
    let mut failures = Vec::new();
    for f in &files {
        check_file(f, false, &mut failures);
    }
    assert!(
        failures.is_empty(),
        "{} corpus failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
