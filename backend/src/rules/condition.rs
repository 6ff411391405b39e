//! Rule conditions: compiling a CEL `if` (size, depth and nesting limits; which event fields
//! it names), the regex cache behind `matches`, and the CEL values of an event and a device.

use std::collections::HashMap;
use std::sync::Arc;

use cel::common::types::{CelBool, CelString};
use cel::objects::{Key, Map};
use cel::{Env, Program, Value};

use super::{DeviceView, EventKind, RuleEvent};

/// Longest `if` accepted, in bytes (the shipped conditions are under 80). The CEL parser and
/// evaluator recurse: found by the rule_parse fuzz target, a 4 KiB chain like `1+1+…+1`
/// overflowed the stack when evaluated, and an error past column 65,535 panicked while
/// formatting its caret line.
pub const MAX_CONDITION_LEN: usize = 1024;
/// Deepest expression tree accepted in an `if` (the shipped conditions are 4 deep).
pub const MAX_CONDITION_DEPTH: usize = 32;
/// Comprehensions (`all`, `exists`, `exists_one`, `map`, `filter`) nested in one another, at
/// most: each level multiplies the work, and three levels over 60-element lists (a
/// 400-byte condition) took seconds per event.
pub const MAX_COMPREHENSION_NESTING: usize = 2;

/// The subexpressions of `e`, and whether they are the body of a comprehension.
pub(super) fn children(e: &cel::IdedExpr) -> (Vec<&cel::IdedExpr>, bool) {
    use cel::common::ast::{EntryExpr, Expr, IdedEntryExpr};
    fn entry(x: &IdedEntryExpr) -> [Option<&cel::IdedExpr>; 2] {
        match &x.expr {
            EntryExpr::MapEntry(e) => [Some(&e.key), Some(&e.value)],
            EntryExpr::StructField(f) => [Some(&f.value), None],
        }
    }
    match &e.expr {
        Expr::Call(c) => (
            c.target.iter().map(|t| &**t).chain(c.args.iter()).collect(),
            false,
        ),
        Expr::Comprehension(c) => (
            vec![
                &c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ],
            true,
        ),
        Expr::List(l) => (l.elements.iter().collect(), false),
        Expr::Map(m) => (m.entries.iter().flat_map(entry).flatten().collect(), false),
        Expr::Struct(st) => (st.entries.iter().flat_map(entry).flatten().collect(), false),
        Expr::Select(sel) => (vec![&*sel.operand], false),
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => (Vec::new(), false),
    }
}

/// How deep `expr`'s tree is, and how deeply its comprehensions nest; walked without
/// recursion (a deep tree is what is refused).
pub(super) fn expr_shape(expr: &cel::IdedExpr) -> (usize, usize) {
    let (mut deepest, mut nesting) = (0, 0);
    let mut stack = vec![(expr, 1usize, 0usize)];
    while let Some((e, depth, comprehensions)) = stack.pop() {
        deepest = deepest.max(depth);
        nesting = nesting.max(comprehensions);
        let (kids, comprehension) = children(e);
        let inner = comprehensions + usize::from(comprehension);
        stack.extend(kids.into_iter().map(|k| (k, depth + 1, inner)));
    }
    (deepest, nesting)
}

/// Adds the `event` fields `expr` names (`event.battery_pct`, `has(event.seq)`) to `names`.
/// False when it reads `event` in any other way (`event["seq"]`, `size(event)`, a
/// comprehension over it): then it may need every field.
pub(super) fn event_fields_named(expr: &cel::IdedExpr, names: &mut Vec<String>) -> bool {
    use cel::common::ast::Expr;
    let mut stack = vec![expr];
    while let Some(e) = stack.pop() {
        match &e.expr {
            Expr::Select(sel) if matches!(&sel.operand.expr, Expr::Ident(n) if n == "event") => {
                if !names.contains(&sel.field) {
                    names.push(sel.field.clone());
                }
            }
            Expr::Ident(n) if n == "event" => return false,
            _ => stack.extend(children(e).0),
        }
    }
    true
}

/// Compiles an `if`, refusing what is too long, too deep or too nested to evaluate safely.
pub(super) fn compile_condition(env: &Env, src: &str) -> Result<Program, String> {
    if src.len() > MAX_CONDITION_LEN {
        return Err(format!(
            "if: {} bytes; the maximum is {MAX_CONDITION_LEN}",
            src.len()
        ));
    }
    // The parser recurses for each bracket, before the tree can be measured.
    let mut open = 0usize;
    for b in src.bytes() {
        match b {
            b'(' | b'[' | b'{' => open += 1,
            b')' | b']' | b'}' => open = open.saturating_sub(1),
            _ => {}
        }
        if open > MAX_CONDITION_DEPTH {
            return Err(format!(
                "if: brackets nest more than {MAX_CONDITION_DEPTH} deep"
            ));
        }
    }
    let program = env.compile(src).map_err(|e| format!("if: {e}"))?;
    let (depth, nesting) = expr_shape(program.expression());
    if depth > MAX_CONDITION_DEPTH {
        return Err(format!(
            "if: the expression nests {depth} deep; the maximum is {MAX_CONDITION_DEPTH}"
        ));
    }
    if nesting > MAX_COMPREHENSION_NESTING {
        return Err(format!(
            "if: comprehensions (all, exists, exists_one, map, filter) nest {nesting} deep; \
             the maximum is {MAX_COMPREHENSION_NESTING}"
        ));
    }
    Ok(program)
}

/// Compiled `matches` patterns kept; the map is emptied when it is full (patterns built from
/// event data could otherwise grow it without bound).
const REGEX_CACHE_MAX: usize = 256;
/// Compiled size limit for a `matches` pattern.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

pub(super) static REGEXES: std::sync::LazyLock<
    std::sync::RwLock<HashMap<String, Arc<regex::Regex>>>,
> = std::sync::LazyLock::new(Default::default);

/// CEL's standard library plus `string.matches(re)` with compiled patterns cached. The
/// standard `matches` (cel's `regex` feature, left off) compiles its pattern on every call,
/// and a Unicode-aware pattern like the shipped `(?i)\b(switch|talk|change) to\b` takes
/// ~15 ms to compile: more than the rest of a voice turn on instant providers.
pub(super) fn rule_env() -> Result<Env, cel::DeclarationError> {
    let mut env = Env::stdlib();
    cel::add_member_overload!(env, fn cached_matches: (CelString, CelString) -> Result<CelBool>, name = "matches")?;
    Ok(env)
}

pub(super) fn cached_matches(
    this: &CelString<'_>,
    re: &CelString<'_>,
) -> Result<CelBool, cel::ExecutionError> {
    let pattern = re.inner();
    let cached = REGEXES.read().ok().and_then(|m| m.get(pattern).cloned());
    let compiled = match cached {
        Some(r) => r,
        None => {
            let r = regex::RegexBuilder::new(pattern)
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
                .map_err(|err| cel::ExecutionError::FunctionError {
                    function: "matches".into(),
                    message: format!("'{pattern}' not a valid regex:\n{err}"),
                })?;
            let r = Arc::new(r);
            if let Ok(mut m) = REGEXES.write() {
                if m.len() >= REGEX_CACHE_MAX {
                    m.clear();
                }
                m.insert(pattern.to_owned(), r.clone());
            }
            r
        }
    };
    Ok(CelBool::from(compiled.is_match(this.inner())))
}

/// Map keys rules see, allocated once (building a CEL map per event otherwise allocates a
/// string per key).
pub(super) static KEYS: std::sync::LazyLock<HashMap<&'static str, Key>> =
    std::sync::LazyLock::new(|| {
        [
            "kind",
            "topic",
            "id",
            "persona",
            "online",
            "battery_pct",
            "seq",
            "ts_ms",
            "uptime_s",
            "cpu_temp_c",
            "rssi_dbm",
            "free_mem_kb",
            "button",
            "action",
            "agent_version",
            "boot_id",
            "session_id",
            "text",
            "reason",
            "state",
        ]
        .into_iter()
        .map(|k| (k, Key::String(Arc::new(k.to_owned()))))
        .collect()
    });

pub(super) static KIND_VALUES: std::sync::LazyLock<[Value; 5]> = std::sync::LazyLock::new(|| {
    EventKind::ALL.map(|k| Value::String(Arc::new(k.as_str().to_owned())))
});

pub(super) fn key(s: &str) -> Key {
    KEYS.get(s)
        .cloned()
        .unwrap_or_else(|| Key::String(Arc::new(s.to_owned())))
}

/// `event` as rules see it, with only the `wanted` fields (`None`: all).
pub(super) fn event_value(event: &RuleEvent, wanted: Option<&[String]>) -> Value {
    let want = |name: &str| wanted.is_none_or(|w| w.iter().any(|n| n == name));
    let mut m: HashMap<Key, Value> = HashMap::with_capacity(event.fields.len() + 2);
    if want("kind") {
        m.insert(key("kind"), KIND_VALUES[event.kind.index()].clone());
    }
    if want("topic") {
        m.insert(
            key("topic"),
            Value::String(Arc::new(event.topic.to_string())),
        );
    }
    for (name, f) in event.fields.iter().filter(|(name, _)| want(name)) {
        m.insert(key(name), f.into());
    }
    Value::Map(Map { map: Arc::new(m) })
}

pub(super) fn device_value(d: &DeviceView) -> Value {
    let mut m: HashMap<Key, Value> = HashMap::with_capacity(4);
    m.insert(key("id"), Value::String(Arc::new(d.id.clone())));
    m.insert(key("persona"), Value::String(Arc::new(d.persona.clone())));
    m.insert(key("online"), Value::Bool(d.online));
    if let Some(b) = d.battery_pct {
        m.insert(key("battery_pct"), Value::Float(b));
    }
    Value::Map(Map { map: Arc::new(m) })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{button, personas};
    use super::super::{RuleSet, DEFAULT_RULES};
    use super::*;

    #[test]
    fn only_the_event_fields_conditions_name_are_built_and_any_other_use_builds_all() {
        let set = RuleSet::parse(DEFAULT_RULES, &personas()).unwrap();
        let mut named = set
            .event_fields
            .clone()
            .expect("the shipped rules name fields");
        named.sort();
        assert_eq!(named, ["action", "battery_pct", "button", "online", "text"]);
        let ev = button("persona", "press");
        let d = DeviceView::default();
        // What each condition sees, and what it gives, over the whole event or the pruned one.
        let verdict = |expr: &str, expect_all: bool| {
            let set = RuleSet::parse(&condition(expr), &personas()).unwrap();
            assert_eq!(set.event_fields.is_none(), expect_all, "{expr}");
            set.evaluate(&ev, &d, 0)[0].1.clone()
        };
        assert_eq!(
            verdict("event.kind == \"button\" && event.seq == 1", false),
            Ok(true)
        );
        assert_eq!(
            verdict("event.topic.endsWith(\"/button\")", false),
            Ok(true)
        );
        assert_eq!(
            verdict("has(event.seq) && !has(event.battery_pct)", false),
            Ok(true)
        );
        let Value::Map(pruned) = event_value(&ev, Some(&["seq".to_owned()])) else {
            panic!("a map")
        };
        assert_eq!(pruned.map.len(), 1, "only what a condition names is built");
        assert_eq!(verdict("size(event) == 5", true), Ok(true));
        assert_eq!(verdict("event[\"seq\"] == 1", true), Ok(true));
        assert_eq!(verdict("event.all(k, k != \"nope\")", true), Ok(true));
        assert_eq!(
            verdict("[1].exists(event, event == 1) && event.seq == 1", true),
            Ok(true),
            "a comprehension variable named event: every field, to be safe"
        );
    }

    fn condition(expr: &str) -> String {
        format!(
            "[[rule]]\nname = \"c\"\non = \"button\"\nif = '{expr}'\ndo = [{{ log = \"x\" }}]\n"
        )
    }

    #[test]
    fn conditions_too_long_or_too_deep_are_refused_not_a_stack_overflow() {
        // Found by the rule_parse fuzz target: evaluating `1+1+…` overflowed the stack, and a
        // compile error past column 65,535 panicked while being formatted. All of it on a
        // thread with half the stack of tokio's workers (2 MiB), in a debug build.
        std::thread::Builder::new()
            .stack_size(1024 * 1024)
            .spawn(deep_conditions)
            .unwrap()
            .join()
            .unwrap();
    }

    fn deep_conditions() {
        for (expr, msg) in [
            (
                format!("{}1 == 1", "1+".repeat(2048)),
                "the maximum is 1024",
            ),
            (format!("{}1 == 1", "1+".repeat(500)), "nests 502 deep"),
            (format!("{}1 == 1", "1+".repeat(40)), "nests"),
            (format!("event{} == 1", ".a".repeat(40)), "nests"),
            (
                format!("{}1{} == 1", "[".repeat(40), "]".repeat(40)),
                "brackets nest",
            ),
            // Found by the rule_parse target built without optimisation: unbalanced brackets
            // overflowed the stack inside the parser.
            (
                format!("[1, 2{}, 3].exists(x, x)", "[S".repeat(40)),
                "brackets nest",
            ),
            (
                format!("{}true{}", "(".repeat(70_000), ")".repeat(70_000)),
                "maximum",
            ),
            (
                "[1, 2].all(a, [3].exists(b, [4].all(c, a + b + c > 0)))".into(),
                "comprehensions (all, exists, exists_one, map, filter) nest 3 deep",
            ),
        ] {
            let err = RuleSet::parse(&condition(&expr), &personas()).unwrap_err();
            assert!(err.message.contains(msg), "{}: {err}", &expr[..20]);
            assert_eq!(err.line, 4);
        }
        // The deepest accepted conditions compile and evaluate.
        let depth = MAX_CONDITION_DEPTH - 2; // the chain under `==`, and a leaf
        let d = DeviceView::default();
        for expr in [
            format!("{}1 == 1", "1+".repeat(depth)),
            format!("{}1 == 1", "-".repeat(depth)),
            format!("event{} == 1", ".a".repeat(depth)),
            format!("{}true", "!".repeat(depth + 1)),
            format!("{}1{} == 1", "[".repeat(depth), "]".repeat(depth)),
            format!("event.button == \"{}\"", "x".repeat(MAX_CONDITION_LEN - 19)),
            "[1, 2].all(a, [3].exists(b, a + b > 0)) && [5].map(x, x * 2) == [10]".into(),
        ] {
            let set = RuleSet::parse(&condition(&expr), &personas())
                .unwrap_or_else(|e| panic!("{}: {e}", &expr[..20]));
            let _ = set.evaluate(&button("a", "press"), &d, 0);
        }
    }
}
