//! The Calico selector language (`dataplane::policy::selector`): parse, print, parse back,
//! and match against labels made from the input. Never a panic; the printed form of a
//! selector parses back to an equal selector that matches the same labels; `!(s)` matches
//! exactly what `s` does not; `and(a, b)` what both match.
//!
//! Input: the selector on the first line; every later `key=value` line is a label. A second
//! set of labels is made from the selector itself (each key-like word gets a quoted value of
//! the selector), so that its tests hit labels that exist. Seeds in `corpus/selector/`.
#![no_main]

use dataplane::policy::selector::{Labels, Selector};
use libfuzzer_sys::fuzz_target;

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "._/-".contains(c)
}

/// Labels whose keys are the selector's key-like words and whose values its quoted strings.
fn labels_from(selector: &str) -> Labels {
    let words: Vec<&str> = selector
        .split(|c: char| !is_key_char(c))
        .filter(|w| !w.is_empty())
        .collect();
    let mut values: Vec<&str> = Vec::new();
    for quote in ['\'', '"'] {
        values.extend(selector.split(quote).skip(1).step_by(2));
    }
    values.push("");
    words
        .iter()
        .enumerate()
        .map(|(i, w)| ((*w).to_owned(), values[i % values.len()].to_owned()))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.lines();
    let source = lines.next().unwrap_or_default();
    let given: Labels = lines
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let derived = labels_from(source);

    let sel = match Selector::parse(source) {
        Ok(s) => s,
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.starts_with("bad selector") && !e.reason.is_empty(),
                "{msg}"
            );
            return;
        }
    };
    let printed = sel.to_string();
    let again = Selector::parse(&printed)
        .unwrap_or_else(|e| panic!("printed form {printed:?} of {source:?} does not parse: {e}"));
    assert_eq!(again, sel, "{source:?} printed as {printed:?}");
    assert_eq!(again.to_string(), printed, "printing is not stable");

    let has_first = derived
        .keys()
        .next()
        .and_then(|k| Selector::parse(&format!("has({k})")).ok());
    for labels in [&given, &derived, &Labels::new()] {
        let m = sel.matches(labels);
        assert_eq!(again.matches(labels), m, "{printed:?} on {labels:?}");
        if let Ok(not) = Selector::parse(&format!("!({printed})")) {
            assert_eq!(not.matches(labels), !m, "!({printed}) on {labels:?}");
        }
        if let Some(h) = &has_first {
            let both = Selector::and(&sel, h);
            assert_eq!(
                both.matches(labels),
                m && h.matches(labels),
                "{both} on {labels:?}"
            );
        }
    }
});
