//! The Calico selector language: parsing, matching against labels, and a canonical printed
//! form.
//!
//! Grammar (whitespace between tokens is insignificant):
//!
//! ```text
//! selector := ε | or
//! or       := and ( "||" and )*
//! and      := unary ( "&&" unary )*
//! unary    := "!" unary | "(" or ")" | "all" "(" ")" | "global" "(" ")"
//!           | "has" "(" key ")" | key test
//! test     := "==" value | "!=" value | "in" set | "not" "in" set
//!           | "contains" value | "starts" "with" value | "ends" "with" value
//! set      := "{" ( value ( "," value )* )? "}"
//! value    := "'" [^']* "'" | '"' [^"]* '"'
//! key      := [A-Za-z0-9._/-]+
//! ```
//!
//! No word is reserved: `has`, `all` and `global` are functions only when a `(` follows, and
//! the operator words only count where an operator is expected, so `has == 'x'` tests the
//! label `has`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

/// An endpoint's or namespace's labels.
pub type Labels = BTreeMap<String, String>;

/// The deepest nesting of `(` and `!` that [`Selector::parse`] accepts. It bounds the
/// recursion of parsing, and with it of matching, printing and dropping the tree, so that a
/// hostile selector cannot overflow the stack.
pub const MAX_DEPTH: usize = 128;

/// A parsed selector. Two selectors are equal when they parse to the same tree: the
/// grouping of `&&` and `||` and the order and repetition of values in a set do not count,
/// everything else does (`!(a == 'x')` and `a != 'x'` differ).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Selector(Expr);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad selector {selector:?}: {reason}")]
pub struct SelectorError {
    pub selector: String,
    pub reason: String,
}

impl Selector {
    /// Parses a selector; an empty one (or only whitespace) selects everything.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        parse_expr(s).map(Self).map_err(|fail| SelectorError {
            selector: s.to_owned(),
            reason: format!("at column {}: {}", column(s, fail.at), fail.reason),
        })
    }

    /// The selector that matches everything.
    pub fn all() -> Self {
        Self(Expr::All)
    }

    /// Whether this is `all()` (or the empty selector). `global()`, which matches every
    /// workload endpoint too, is not: it means something else to Calico for other endpoints.
    pub fn is_all(&self) -> bool {
        self.0 == Expr::All
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.0.matches(labels)
    }

    /// The selector matching what both `a` and `b` match.
    pub fn and(a: &Selector, b: &Selector) -> Selector {
        if a.is_all() {
            b.clone()
        } else if b.is_all() {
            a.clone()
        } else {
            Self(Expr::and_of(vec![a.0.clone(), b.0.clone()]))
        }
    }
}

impl Default for Selector {
    fn default() -> Self {
        Self::all()
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// The canonical form: single spaces around operators, `&&` and `||` parenthesised only
/// where precedence needs it, set values sorted. It parses back to an equal selector.
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.write(f, Place::Top)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Expr {
    /// `all()`, and the empty selector.
    All,
    /// `global()`. Calico uses it in namespace selectors for endpoints outside any
    /// namespace; here it matches every workload endpoint.
    Global,
    Has(String),
    Label(String, Test),
    Not(Box<Expr>),
    /// Two or more terms, none of them an `And`.
    And(Vec<Expr>),
    /// Two or more terms, none of them an `Or`.
    Or(Vec<Expr>),
}

/// A test on the value of one label.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Test {
    Eq(String),
    Ne(String),
    In(BTreeSet<String>),
    NotIn(BTreeSet<String>),
    Contains(String),
    StartsWith(String),
    EndsWith(String),
}

/// Where an expression is printed, which decides whether it needs parentheses.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Place {
    Top,
    OrTerm,
    AndTerm,
    NotOperand,
}

impl Expr {
    fn matches(&self, labels: &Labels) -> bool {
        match self {
            Self::All | Self::Global => true,
            Self::Has(key) => labels.contains_key(key),
            Self::Label(key, test) => test.matches(labels.get(key).map(String::as_str)),
            Self::Not(e) => !e.matches(labels),
            Self::And(terms) => terms.iter().all(|e| e.matches(labels)),
            Self::Or(terms) => terms.iter().any(|e| e.matches(labels)),
        }
    }

    /// The conjunction of `terms`, keeping the invariant that an `And` holds no `And` (so the
    /// printed form parses back to the same tree).
    fn and_of(terms: Vec<Expr>) -> Expr {
        let mut flat = Vec::with_capacity(terms.len());
        for term in terms {
            match term {
                Self::And(inner) => flat.extend(inner),
                other => flat.push(other),
            }
        }
        Self::single_or(flat, Self::And)
    }

    fn or_of(terms: Vec<Expr>) -> Expr {
        let mut flat = Vec::with_capacity(terms.len());
        for term in terms {
            match term {
                Self::Or(inner) => flat.extend(inner),
                other => flat.push(other),
            }
        }
        Self::single_or(flat, Self::Or)
    }

    fn single_or(mut terms: Vec<Expr>, build: fn(Vec<Expr>) -> Expr) -> Expr {
        if terms.len() == 1
            && let Some(only) = terms.pop()
        {
            return only;
        }
        build(terms)
    }

    fn write(&self, f: &mut fmt::Formatter<'_>, place: Place) -> fmt::Result {
        match self {
            Self::All => f.write_str("all()"),
            Self::Global => f.write_str("global()"),
            Self::Has(key) => write!(f, "has({key})"),
            Self::Label(key, test) if place == Place::NotOperand => write!(f, "({key} {test})"),
            Self::Label(key, test) => write!(f, "{key} {test}"),
            Self::Not(e) => {
                f.write_str("!")?;
                e.write(f, Place::NotOperand)
            }
            Self::And(terms) => {
                write_terms(f, terms, " && ", place >= Place::AndTerm, Place::AndTerm)
            }
            Self::Or(terms) => write_terms(f, terms, " || ", place >= Place::OrTerm, Place::OrTerm),
        }
    }
}

fn write_terms(
    f: &mut fmt::Formatter<'_>,
    terms: &[Expr],
    op: &str,
    parens: bool,
    place: Place,
) -> fmt::Result {
    if parens {
        f.write_str("(")?;
    }
    for (i, term) in terms.iter().enumerate() {
        if i > 0 {
            f.write_str(op)?;
        }
        term.write(f, place)?;
    }
    if parens {
        f.write_str(")")?;
    }
    Ok(())
}

impl Test {
    fn matches(&self, value: Option<&str>) -> bool {
        let Some(value) = value else {
            return matches!(self, Self::Ne(_) | Self::NotIn(_));
        };
        match self {
            Self::Eq(v) => value == v,
            Self::Ne(v) => value != v,
            Self::In(set) => set.contains(value),
            Self::NotIn(set) => !set.contains(value),
            Self::Contains(s) => value.contains(s.as_str()),
            Self::StartsWith(s) => value.starts_with(s.as_str()),
            Self::EndsWith(s) => value.ends_with(s.as_str()),
        }
    }
}

impl fmt::Display for Test {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (op, value) = match self {
            Self::Eq(v) => ("==", v),
            Self::Ne(v) => ("!=", v),
            Self::Contains(v) => ("contains", v),
            Self::StartsWith(v) => ("starts with", v),
            Self::EndsWith(v) => ("ends with", v),
            Self::In(set) => return write_set(f, "in", set),
            Self::NotIn(set) => return write_set(f, "not in", set),
        };
        write!(f, "{op} {}", Quoted(value))
    }
}

fn write_set(f: &mut fmt::Formatter<'_>, op: &str, set: &BTreeSet<String>) -> fmt::Result {
    write!(f, "{op} {{")?;
    for (i, value) in set.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{}", Quoted(value))?;
    }
    f.write_str("}")
}

/// A value in the quotes it can be written in. The parser never yields a value holding both
/// kinds of quote.
struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.contains('\'') {
            write!(f, "\"{}\"", self.0)
        } else {
            write!(f, "'{}'", self.0)
        }
    }
}

/// A parse failure at a byte offset of the input.
struct Fail {
    at: usize,
    reason: String,
}

/// The 1-based column (in characters) of a byte offset.
fn column(s: &str, at: usize) -> usize {
    s.get(..at).map_or(0, |before| before.chars().count()) + 1
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tok<'a> {
    LParen,
    RParen,
    LBrace,
    RBrace,
    Comma,
    Bang,
    EqEq,
    NotEq,
    AndAnd,
    OrOr,
    Word(&'a str),
    Str(&'a str),
    End,
}

impl fmt::Display for Tok<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Self::LParen => "(",
            Self::RParen => ")",
            Self::LBrace => "{",
            Self::RBrace => "}",
            Self::Comma => ",",
            Self::Bang => "!",
            Self::EqEq => "==",
            Self::NotEq => "!=",
            Self::AndAnd => "&&",
            Self::OrOr => "||",
            Self::End => return f.write_str("end of input"),
            Self::Word(w) => return write!(f, "`{}`", shorten(w)),
            Self::Str(v) => return write!(f, "string {:?}", shorten(v)),
        };
        write!(f, "`{text}`")
    }
}

/// Cuts long words and values so that an error about a huge input stays readable.
fn shorten(s: &str) -> String {
    const SHOWN: usize = 40;
    match s.char_indices().nth(SHOWN) {
        Some((end, _)) => format!("{}…", &s[..end]),
        None => s.to_owned(),
    }
}

fn is_key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-')
}

/// Splits `s` into tokens, each with its byte offset, ending with `End`.
fn lex(s: &str) -> Result<Vec<(Tok<'_>, usize)>, Fail> {
    let bytes = s.as_bytes();
    let mut toks = Vec::new();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let start = i;
        let next = bytes.get(i + 1).copied();
        let fail = |reason: String| Err(Fail { at: start, reason });
        let (tok, len) = match b {
            b'(' => (Tok::LParen, 1),
            b')' => (Tok::RParen, 1),
            b'{' => (Tok::LBrace, 1),
            b'}' => (Tok::RBrace, 1),
            b',' => (Tok::Comma, 1),
            b'!' if next == Some(b'=') => (Tok::NotEq, 2),
            b'!' => (Tok::Bang, 1),
            b'=' if next == Some(b'=') => (Tok::EqEq, 2),
            b'&' if next == Some(b'&') => (Tok::AndAnd, 2),
            b'|' if next == Some(b'|') => (Tok::OrOr, 2),
            b'=' => return fail("expected `==`".to_owned()),
            b'&' => return fail("expected `&&`".to_owned()),
            b'|' => return fail("expected `||`".to_owned()),
            b'\'' | b'"' => {
                let quote = char::from(b);
                let rest = s.get(i + 1..).unwrap_or_default();
                let Some(len) = rest.find(quote) else {
                    return fail(format!("string starting here has no closing {quote}"));
                };
                (Tok::Str(&rest[..len]), len + 2)
            }
            b if is_key_byte(b) => {
                let len = bytes[i..].iter().take_while(|&&b| is_key_byte(b)).count();
                (Tok::Word(&s[i..i + len]), len)
            }
            _ => {
                let c = s
                    .get(i..)
                    .and_then(|rest| rest.chars().next())
                    .unwrap_or('\u{fffd}');
                if c.is_whitespace() {
                    i += c.len_utf8();
                    continue;
                }
                return fail(format!("unexpected character {c:?}"));
            }
        };
        toks.push((tok, start));
        i += len;
    }
    toks.push((Tok::End, s.len()));
    Ok(toks)
}

fn parse_expr(s: &str) -> Result<Expr, Fail> {
    let mut parser = Parser {
        toks: lex(s)?,
        next: 0,
        depth: 0,
    };
    if parser.peek() == Tok::End {
        return Ok(Expr::All);
    }
    let expr = parser.or()?;
    parser.expect(Tok::End, "`&&`, `||` or end of input")?;
    Ok(expr)
}

struct Parser<'a> {
    /// Never empty: the last token is `End`.
    toks: Vec<(Tok<'a>, usize)>,
    next: usize,
    /// How many `(` and `!` enclose the current position.
    depth: usize,
}

impl<'a> Parser<'a> {
    fn current(&self) -> (Tok<'a>, usize) {
        // Past the end (which `bump` never goes), act as if at `End`.
        self.toks
            .get(self.next)
            .or(self.toks.last())
            .copied()
            .unwrap_or((Tok::End, 0))
    }

    fn peek(&self) -> Tok<'a> {
        self.current().0
    }

    fn bump(&mut self) -> Tok<'a> {
        let (tok, _) = self.current();
        if tok != Tok::End {
            self.next += 1;
        }
        tok
    }

    fn unexpected<T>(&self, expected: &str) -> Result<T, Fail> {
        let (tok, at) = self.current();
        Err(Fail {
            at,
            reason: format!("expected {expected}, found {tok}"),
        })
    }

    fn expect(&mut self, want: Tok<'_>, expected: &str) -> Result<(), Fail> {
        if self.peek() == want {
            self.bump();
            Ok(())
        } else {
            self.unexpected(expected)
        }
    }

    /// Enters one level of `(` or `!`, whose token is current.
    fn enter(&mut self) -> Result<(), Fail> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            let (_, at) = self.current();
            return Err(Fail {
                at,
                reason: format!("nested deeper than {MAX_DEPTH} levels of `(` and `!`"),
            });
        }
        self.bump();
        Ok(())
    }

    fn or(&mut self) -> Result<Expr, Fail> {
        let mut terms = vec![self.and()?];
        while self.peek() == Tok::OrOr {
            self.bump();
            terms.push(self.and()?);
        }
        Ok(Expr::or_of(terms))
    }

    fn and(&mut self) -> Result<Expr, Fail> {
        let mut terms = vec![self.unary()?];
        while self.peek() == Tok::AndAnd {
            self.bump();
            terms.push(self.unary()?);
        }
        Ok(Expr::and_of(terms))
    }

    fn unary(&mut self) -> Result<Expr, Fail> {
        match self.peek() {
            Tok::Bang => {
                self.enter()?;
                let operand = self.unary()?;
                self.depth -= 1;
                Ok(Expr::Not(Box::new(operand)))
            }
            Tok::LParen => {
                self.enter()?;
                let inner = self.or()?;
                self.expect(Tok::RParen, "`&&`, `||` or `)`")?;
                self.depth -= 1;
                Ok(inner)
            }
            Tok::Word(word) => {
                self.bump();
                match word {
                    "has" | "all" | "global" if self.peek() == Tok::LParen => {
                        self.bump();
                        self.function(word)
                    }
                    key => self.test(key),
                }
            }
            _ => self.unexpected("a label key, `has(`, `all()`, `global()`, `!` or `(`"),
        }
    }

    /// The rest of `has(key)`, `all()` or `global()` after the `(`.
    fn function(&mut self, name: &str) -> Result<Expr, Fail> {
        let expr = match name {
            "has" => Expr::Has(self.key()?.to_owned()),
            "all" => Expr::All,
            _ => Expr::Global,
        };
        self.expect(Tok::RParen, "`)`")?;
        Ok(expr)
    }

    fn key(&mut self) -> Result<&'a str, Fail> {
        match self.peek() {
            Tok::Word(key) => {
                self.bump();
                Ok(key)
            }
            _ => self.unexpected("a label key"),
        }
    }

    /// The operator and operand after a label key.
    fn test(&mut self, key: &str) -> Result<Expr, Fail> {
        let test = match self.peek() {
            Tok::EqEq => Test::Eq(self.bumped_value()?),
            Tok::NotEq => Test::Ne(self.bumped_value()?),
            Tok::Word("in") => Test::In(self.bumped_set()?),
            Tok::Word("not") => {
                self.bump();
                if self.peek() != Tok::Word("in") {
                    return self.unexpected("`in` after `not`");
                }
                Test::NotIn(self.bumped_set()?)
            }
            Tok::Word("contains") => Test::Contains(self.bumped_value()?),
            Tok::Word("starts") => {
                self.bump();
                if self.peek() != Tok::Word("with") {
                    return self.unexpected("`with` after `starts`");
                }
                Test::StartsWith(self.bumped_value()?)
            }
            Tok::Word("ends") => {
                self.bump();
                if self.peek() != Tok::Word("with") {
                    return self.unexpected("`with` after `ends`");
                }
                Test::EndsWith(self.bumped_value()?)
            }
            _ => {
                return self.unexpected(&format!(
                    "an operator (`==`, `!=`, `in`, `not in`, `contains`, `starts with`, \
                     `ends with`) after label key `{}`",
                    shorten(key)
                ));
            }
        };
        Ok(Expr::Label(key.to_owned(), test))
    }

    /// Skips the operator, then reads a quoted value.
    fn bumped_value(&mut self) -> Result<String, Fail> {
        self.bump();
        self.value()
    }

    fn value(&mut self) -> Result<String, Fail> {
        match self.peek() {
            Tok::Str(value) => {
                self.bump();
                Ok(value.to_owned())
            }
            _ => self.unexpected("a quoted value"),
        }
    }

    /// Skips the operator, then reads `{ 'a', 'b' }`.
    fn bumped_set(&mut self) -> Result<BTreeSet<String>, Fail> {
        self.bump();
        self.expect(Tok::LBrace, "`{`")?;
        let mut set = BTreeSet::new();
        if self.peek() == Tok::RBrace {
            self.bump();
            return Ok(set);
        }
        loop {
            set.insert(self.value()?);
            match self.peek() {
                Tok::Comma => {}
                Tok::RBrace => {
                    self.bump();
                    return Ok(set);
                }
                _ => return self.unexpected("`,` or `}`"),
            }
            self.bump();
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::collection::{btree_map, vec};
    use proptest::prelude::*;
    use proptest::sample::select;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn sample_labels() -> Labels {
        labels(&[
            ("app", "web"),
            ("tier", "frontend"),
            ("app.kubernetes.io/name", "nginx"),
            ("projectcalico.org/namespace", "default"),
            ("empty", ""),
            ("quote", "it's"),
            ("dquote", "say \"hi\""),
            ("unicode", "héllo wörld"),
            ("has", "1"),
            ("in", "x"),
            ("not", "y"),
        ])
    }

    fn check(cases: &[(&str, bool)]) {
        let l = sample_labels();
        for &(text, want) in cases {
            let sel = Selector::parse(text).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(sel.matches(&l), want, "{text:?}");
            let reparsed = Selector::parse(&sel.to_string()).unwrap();
            assert_eq!(reparsed, sel, "{text:?} printed as {sel}");
        }
    }

    #[test]
    fn all_and_empty() {
        check(&[
            ("", true),
            (" \t\r\n", true),
            ("all()", true),
            ("all ( )", true),
            ("global()", true),
        ]);
        assert!(Selector::all().matches(&Labels::new()));
        assert!(Selector::parse("global()").unwrap().matches(&Labels::new()));
        for (text, all) in [
            ("", true),
            ("  ", true),
            ("all()", true),
            ("(all())", true),
            ("global()", false),
            ("has(a)", false),
            ("!all()", false),
        ] {
            assert_eq!(Selector::parse(text).unwrap().is_all(), all, "{text:?}");
        }
        assert_eq!(Selector::parse("").unwrap(), Selector::all());
        assert_eq!(Selector::default(), Selector::all());
        assert_eq!(Selector::all().to_string(), "all()");
    }

    #[test]
    fn equality() {
        check(&[
            ("app == 'web'", true),
            ("app == \"web\"", true),
            ("app=='web'", true),
            ("app == 'db'", false),
            ("app == ''", false),
            ("missing == 'web'", false),
            ("missing == ''", false),
            ("empty == ''", true),
            ("app.kubernetes.io/name == 'nginx'", true),
            ("projectcalico.org/namespace == 'default'", true),
            ("quote == \"it's\"", true),
            ("dquote == 'say \"hi\"'", true),
            ("unicode == 'héllo wörld'", true),
        ]);
    }

    #[test]
    fn inequality_is_true_for_absent_labels() {
        check(&[
            ("app != 'db'", true),
            ("app != 'web'", false),
            ("app!='web'", false),
            ("missing != 'web'", true),
            ("missing != ''", true),
            ("empty != ''", false),
        ]);
    }

    #[test]
    fn has() {
        check(&[
            ("has(app)", true),
            ("has( app )", true),
            ("has(empty)", true),
            ("has(app.kubernetes.io/name)", true),
            ("has(missing)", false),
            ("!has(missing)", true),
            ("!has(app)", false),
            ("! has(app)", false),
        ]);
    }

    #[test]
    fn set_membership() {
        check(&[
            ("app in {'web', 'db'}", true),
            ("app in {'db','web'}", true),
            ("app in {\"web\"}", true),
            ("app in{'db'}", false),
            ("app in {}", false),
            ("missing in {'web'}", false),
            ("missing in {''}", false),
            ("empty in {''}", true),
        ]);
    }

    #[test]
    fn set_exclusion_is_true_for_absent_labels() {
        check(&[
            ("app not in {'db'}", true),
            ("app not in {'web', 'db'}", false),
            ("app  not\tin{'web'}", false),
            ("app not in {}", true),
            ("missing not in {'web'}", true),
            ("missing not in {''}", true),
            ("missing not in {}", true),
        ]);
    }

    #[test]
    fn string_tests() {
        check(&[
            ("app contains 'e'", true),
            ("app contains 'web'", true),
            ("app contains ''", true),
            ("app contains 'x'", false),
            ("missing contains ''", false),
            ("app starts with 'we'", true),
            ("app starts with ''", true),
            ("app starts with 'eb'", false),
            ("missing starts with ''", false),
            ("app ends with 'eb'", true),
            ("app ends with 'we'", false),
            ("missing ends with ''", false),
            ("unicode contains 'ö'", true),
            ("unicode starts with 'hé'", true),
            ("dquote ends with 'hi\"'", true),
        ]);
    }

    #[test]
    fn keys_named_like_keywords() {
        check(&[
            ("has == '1'", true),
            ("in in {'x'}", true),
            ("not not in {'y'}", false),
            ("not == 'y' && has(has) && has(in)", true),
            ("all == 'x'", false),
            ("contains contains 'x'", false),
            ("starts != 'x'", true),
        ]);
    }

    #[test]
    fn precedence_and_grouping() {
        check(&[
            // `&&` binds tighter than `||`: (F && F) || T.
            ("app == 'db' && tier == 'x' || has(app)", true),
            // T || (F && F); with `||` tighter it would be false.
            ("has(app) || has(x) && has(y)", true),
            ("(has(app) || has(x)) && has(y)", false),
            ("has(app) && has(tier) && has(empty)", true),
            ("has(app) && has(tier) && has(missing)", false),
            ("has(x) || has(y) || has(tier)", true),
            ("has(x) || has(y) || has(z)", false),
            ("((((has(app)))))", true),
            ("has(app)&&(tier=='frontend'||tier=='backend')", true),
        ]);
    }

    #[test]
    fn negation() {
        check(&[
            ("!app == 'web'", false),
            ("!(app == 'web')", false),
            ("!app == 'db'", true),
            ("!!has(app)", true),
            ("!!!has(app)", false),
            ("!(app == 'db' || tier == 'x')", true),
            ("!(has(app) && has(missing))", true),
            // `!` binds tighter than `&&`.
            ("!has(missing) && has(app)", true),
            ("!has(app) && has(missing)", false),
            ("!has(app) || has(tier)", true),
            ("!all()", false),
            ("!global()", false),
        ]);
    }

    #[test]
    fn whitespace_is_insignificant() {
        let canonical = Selector::parse("a == 'x' && (b in {'y'} || !has(c))").unwrap();
        for text in [
            "a=='x'&&(b in{'y'}||!has(c))",
            "  a  ==  'x'  &&  (  b  in  {  'y'  }  ||  !  has  (  c  )  )  ",
            "a\n==\t'x'\r\n&&\n(b\tin\n{'y'}\n||\n!has(c))",
            "a\u{a0}== 'x' && (b in {'y'} || !has(c))",
        ] {
            assert_eq!(Selector::parse(text).unwrap(), canonical, "{text:?}");
        }
        // Inside quotes, whitespace is part of the value.
        assert_ne!(
            Selector::parse("a == 'x '").unwrap(),
            Selector::parse("a == 'x'").unwrap()
        );
    }

    #[test]
    fn canonical_form() {
        for (text, printed) in [
            ("", "all()"),
            ("all()", "all()"),
            ("global ()", "global()"),
            ("app=='web'", "app == 'web'"),
            ("app==\"web\"", "app == 'web'"),
            ("a != \"it's\"", "a != \"it's\""),
            ("a == 'say \"hi\"'", "a == 'say \"hi\"'"),
            ("has( a )", "has(a)"),
            ("a in {'b','a','a'}", "a in {'a', 'b'}"),
            ("a in {}", "a in {}"),
            ("a not in {\"it's\", 'x'}", "a not in {\"it's\", 'x'}"),
            ("a contains 'x'", "a contains 'x'"),
            ("a starts  with 'x'", "a starts with 'x'"),
            ("a ends with 'x'", "a ends with 'x'"),
            (
                "(has(a) || has(b)) && has(c)",
                "(has(a) || has(b)) && has(c)",
            ),
            ("has(a) || (has(b) && has(c))", "has(a) || has(b) && has(c)"),
            (
                "((has(a) && has(b)) && has(c))",
                "has(a) && has(b) && has(c)",
            ),
            ("has(a) && (has(b) && has(c))", "has(a) && has(b) && has(c)"),
            ("has(a) || (has(b) || has(c))", "has(a) || has(b) || has(c)"),
            ("!a == 'x'", "!(a == 'x')"),
            ("!(has(a) || has(b))", "!(has(a) || has(b))"),
            ("!(has(a) && has(b))", "!(has(a) && has(b))"),
            ("!!has(a)", "!!has(a)"),
            ("(!has(a))", "!has(a)"),
        ] {
            let sel = Selector::parse(text).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(sel.to_string(), printed, "{text:?}");
            assert_eq!(Selector::parse(printed).unwrap(), sel, "{text:?}");
        }
        // Grouping of `&&` and `||` and the order of set values do not count; the rest does.
        let eq = |a: &str, b: &str| Selector::parse(a).unwrap() == Selector::parse(b).unwrap();
        assert!(eq(
            "(has(a) && has(b)) && has(c)",
            "has(a) && (has(b) && has(c))"
        ));
        assert!(eq("a in {'x', 'y'}", "a in {'y', 'x', 'x'}"));
        assert!(!eq("has(a) && has(b)", "has(b) && has(a)"));
        assert!(!eq("a != 'x'", "!(a == 'x')"));
        assert!(!eq("all()", "global()"));
    }

    #[test]
    fn conjunction() {
        let a = Selector::parse("has(a) || has(b)").unwrap();
        let c = Selector::parse("c == 'x' && has(d)").unwrap();
        let all = Selector::all();
        assert_eq!(Selector::and(&all, &c), c);
        assert_eq!(Selector::and(&c, &all), c);
        assert_eq!(Selector::and(&all, &all), all);
        let both = Selector::and(&a, &c);
        assert_eq!(both.to_string(), "(has(a) || has(b)) && c == 'x' && has(d)");
        assert_eq!(Selector::parse(&both.to_string()).unwrap(), both);
        let l = labels(&[("b", ""), ("c", "x"), ("d", "")]);
        assert!(both.matches(&l));
        assert!(!both.matches(&labels(&[("b", ""), ("c", "x")])));
        let global = Selector::parse("global()").unwrap();
        assert_eq!(
            Selector::and(&global, &a).to_string(),
            "global() && (has(a) || has(b))"
        );
    }

    #[test]
    fn errors() {
        for (text, reason) in [
            ("app", "at column 4: expected an operator"),
            ("app web", "found `web`"),
            ("app ==", "expected a quoted value, found end of input"),
            (
                "app == web",
                "at column 8: expected a quoted value, found `web`",
            ),
            ("app = 'web'", "at column 5: expected `==`"),
            ("app === 'web'", "expected `==`"),
            (
                "app == 'web",
                "at column 8: string starting here has no closing '",
            ),
            ("app == \"web'", "no closing \""),
            (
                "app == 'web' tier == 'x'",
                "at column 14: expected `&&`, `||` or end of input",
            ),
            (
                "app == 'a' 'b'",
                "expected `&&`, `||` or end of input, found string \"b\"",
            ),
            ("has(app", "expected `)`, found end of input"),
            ("has()", "expected a label key, found `)`"),
            ("has('app')", "expected a label key, found string \"app\""),
            ("has(a b)", "expected `)`, found `b`"),
            ("has", "expected an operator"),
            ("all(", "expected `)`"),
            ("all(x)", "expected `)`, found `x`"),
            ("global(all())", "expected `)`"),
            ("(has(a)", "expected `&&`, `||` or `)`, found end of input"),
            ("has(a))", "expected `&&`, `||` or end of input, found `)`"),
            ("()", "expected a label key"),
            ("has(a) &&", "found end of input"),
            ("&& has(a)", "at column 1: expected a label key"),
            ("has(a) || || has(b)", "found `||`"),
            ("has(a) & has(b)", "expected `&&`"),
            ("has(a) | has(b)", "expected `||`"),
            ("!", "found end of input"),
            ("a != ", "expected a quoted value"),
            ("!= 'x'", "found `!=`"),
            ("app in 'a'", "expected `{`"),
            ("app in {'a',}", "expected a quoted value, found `}`"),
            (
                "app in {'a' 'b'}",
                "expected `,` or `}`, found string \"b\"",
            ),
            ("app in {'a'", "expected `,` or `}`, found end of input"),
            ("app in {a}", "expected a quoted value, found `a`"),
            ("app not 'a'", "expected `in` after `not`"),
            ("app not", "expected `in` after `not`, found end of input"),
            ("app starts 'a'", "expected `with` after `starts`"),
            ("app ends", "expected `with` after `ends`"),
            ("app contains", "expected a quoted value"),
            ("app == 'x' # comment", "unexpected character '#'"),
            ("é == 'x'", "at column 1: unexpected character 'é'"),
            ("a == 'é' ?", "at column 10: unexpected character '?'"),
            ("a == 'x' \u{0}", "unexpected character '\\0'"),
            ("a == 1", "expected a quoted value, found `1`"),
        ] {
            let err = Selector::parse(text).expect_err(text);
            assert_eq!(err.selector, text);
            assert!(err.reason.contains(reason), "{text:?}: {err}");
            assert!(err.to_string().starts_with("bad selector "), "{err}");
        }
    }

    #[test]
    fn error_message_cuts_long_words() {
        let long = "k".repeat(10_000);
        let err = Selector::parse(&format!("{long} {long}")).unwrap_err();
        assert!(err.reason.len() < 300, "{}", err.reason);
        assert!(err.reason.contains("…"));
    }

    #[test]
    fn nesting_is_bounded() {
        let nested = |n: usize| format!("{}has(a){}", "(".repeat(n), ")".repeat(n));
        assert!(Selector::parse(&nested(MAX_DEPTH)).is_ok());
        let err = Selector::parse(&nested(MAX_DEPTH + 1)).unwrap_err();
        assert!(err.reason.contains("nested deeper than 128"), "{err}");

        let negated = |n: usize| format!("{}has(a)", "!".repeat(n));
        let sel = Selector::parse(&negated(MAX_DEPTH)).unwrap();
        assert!(sel.matches(&labels(&[("a", "")])));
        assert_eq!(Selector::parse(&sel.to_string()).unwrap(), sel);
        assert!(Selector::parse(&negated(MAX_DEPTH + 1)).is_err());

        // Mixed nesting counts both kinds.
        let mixed = format!("{}has(a){}", "!(".repeat(65), ")".repeat(65));
        assert!(
            Selector::parse(&mixed)
                .unwrap_err()
                .reason
                .contains("nested")
        );

        // Hostile inputs fail cleanly rather than overflowing the stack.
        for text in [
            "(".repeat(1_000_000),
            "!".repeat(1_000_000),
            "(!".repeat(500_000),
            format!("{}has(a){}", "(".repeat(100_000), ")".repeat(100_000)),
        ] {
            assert!(
                Selector::parse(&text)
                    .unwrap_err()
                    .reason
                    .contains("nested")
            );
        }
    }

    #[test]
    fn wide_inputs() {
        let n = 100_000;
        let many: Vec<String> = (0..n).map(|i| format!("k{i} == 'v{i}'")).collect();
        let ands = Selector::parse(&many.join(" && ")).unwrap();
        let ors = Selector::parse(&many.join(" || ")).unwrap();
        let l = labels(&[("k99999", "v99999")]);
        assert!(!ands.matches(&l));
        assert!(ors.matches(&l));
        let set: Vec<String> = (0..n).map(|i| format!("'{i}'")).collect();
        let in_set = Selector::parse(&format!("a in {{{}}}", set.join(","))).unwrap();
        assert!(in_set.matches(&labels(&[("a", "4242")])));
        assert_eq!(Selector::parse(&in_set.to_string()).unwrap(), in_set);
    }

    /// A selector tree for property tests, evaluated directly.
    #[derive(Clone, Debug)]
    enum Ast {
        All,
        Global,
        Has(&'static str),
        Eq(&'static str, &'static str),
        Ne(&'static str, &'static str),
        In(&'static str, Vec<&'static str>),
        NotIn(&'static str, Vec<&'static str>),
        Contains(&'static str, &'static str),
        StartsWith(&'static str, &'static str),
        EndsWith(&'static str, &'static str),
        Not(Box<Ast>),
        And(Vec<Ast>),
        Or(Vec<Ast>),
    }

    const KEYS: &[&str] = &[
        "app",
        "tier",
        "app.kubernetes.io/name",
        "projectcalico.org/namespace",
        "k_8-s.x",
        "has",
        "all",
        "in",
        "not",
        "starts",
        "with",
    ];

    const VALUES: &[&str] = &[
        "",
        "web",
        "we",
        "eb",
        "db",
        "it's",
        "say \"hi\"",
        "héllo wörld",
        "a && b || !c",
        "{x, y}",
        " ",
    ];

    fn eval(ast: &Ast, labels: &Labels) -> bool {
        let get = |k: &str| labels.get(k).map(String::as_str);
        match ast {
            Ast::All | Ast::Global => true,
            Ast::Has(k) => get(k).is_some(),
            Ast::Eq(k, v) => get(k) == Some(*v),
            Ast::Ne(k, v) => get(k) != Some(*v),
            Ast::In(k, vs) => get(k).is_some_and(|x| vs.contains(&x)),
            Ast::NotIn(k, vs) => !get(k).is_some_and(|x| vs.contains(&x)),
            Ast::Contains(k, v) => get(k).is_some_and(|x| x.contains(v)),
            Ast::StartsWith(k, v) => get(k).is_some_and(|x| x.starts_with(v)),
            Ast::EndsWith(k, v) => get(k).is_some_and(|x| x.ends_with(v)),
            Ast::Not(a) => !eval(a, labels),
            Ast::And(terms) => terms.iter().all(|a| eval(a, labels)),
            Ast::Or(terms) => terms.iter().any(|a| eval(a, labels)),
        }
    }

    fn quote(v: &str) -> String {
        if v.contains('\'') {
            format!("\"{v}\"")
        } else {
            format!("'{v}'")
        }
    }

    /// Writes `ast` fully parenthesised, with `sp` (possibly empty) wherever the grammar
    /// allows whitespace but does not need it.
    fn render(ast: &Ast, sp: &str) -> String {
        let set = |vs: &[&str]| {
            let quoted: Vec<String> = vs.iter().map(|v| quote(v)).collect();
            format!("{{{sp}{}{sp}}}", quoted.join(&format!("{sp},{sp}")))
        };
        let list = |terms: &[Ast], op: &str| {
            let parts: Vec<String> = terms.iter().map(|a| render(a, sp)).collect();
            format!("({sp}{}{sp})", parts.join(&format!("{sp}{op}{sp}")))
        };
        match ast {
            Ast::All => format!("all{sp}({sp})"),
            Ast::Global => format!("global{sp}({sp})"),
            Ast::Has(k) => format!("has{sp}({sp}{k}{sp})"),
            Ast::Eq(k, v) => format!("{k}{sp}=={sp}{}", quote(v)),
            Ast::Ne(k, v) => format!("{k}{sp}!={sp}{}", quote(v)),
            Ast::In(k, vs) => format!("{k} in{sp}{}", set(vs)),
            Ast::NotIn(k, vs) => format!("{k} not {sp}in{sp}{}", set(vs)),
            Ast::Contains(k, v) => format!("{k} contains{sp}{}", quote(v)),
            Ast::StartsWith(k, v) => format!("{k} starts {sp}with{sp}{}", quote(v)),
            Ast::EndsWith(k, v) => format!("{k} ends {sp}with{sp}{}", quote(v)),
            Ast::Not(a) => format!("!{sp}({sp}{}{sp})", render(a, sp)),
            Ast::And(terms) => list(terms, "&&"),
            Ast::Or(terms) => list(terms, "||"),
        }
    }

    fn key() -> impl Strategy<Value = &'static str> {
        select(KEYS)
    }

    fn value() -> impl Strategy<Value = &'static str> {
        select(VALUES)
    }

    fn ast() -> impl Strategy<Value = Ast> {
        let leaf = prop_oneof![
            Just(Ast::All),
            Just(Ast::Global),
            key().prop_map(Ast::Has),
            (key(), value()).prop_map(|(k, v)| Ast::Eq(k, v)),
            (key(), value()).prop_map(|(k, v)| Ast::Ne(k, v)),
            (key(), vec(value(), 0..4)).prop_map(|(k, vs)| Ast::In(k, vs)),
            (key(), vec(value(), 0..4)).prop_map(|(k, vs)| Ast::NotIn(k, vs)),
            (key(), value()).prop_map(|(k, v)| Ast::Contains(k, v)),
            (key(), value()).prop_map(|(k, v)| Ast::StartsWith(k, v)),
            (key(), value()).prop_map(|(k, v)| Ast::EndsWith(k, v)),
        ];
        leaf.prop_recursive(5, 40, 4, |inner| {
            prop_oneof![
                inner.clone().prop_map(|a| Ast::Not(Box::new(a))),
                vec(inner.clone(), 2..5).prop_map(Ast::And),
                vec(inner, 2..5).prop_map(Ast::Or),
            ]
        })
    }

    fn label_sets() -> impl Strategy<Value = Vec<Labels>> {
        let one = btree_map(key(), value(), 0..6).prop_map(|m| {
            m.into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect::<Labels>()
        });
        vec(one, 1..12)
    }

    fn spacing() -> impl Strategy<Value = &'static str> {
        select(&["", " ", "  ", "\t", "\n "][..])
    }

    const SOUP: &[&str] = &[
        "(", ")", "{", "}", ",", "!", "!=", "==", "=", "&&", "&", "||", "|", "has", "all",
        "global", "in", "not", "contains", "starts", "ends", "with", "a", "b.c/d", "-", "'v'",
        "\"w\"", "''", "'", "\"", "é", "\u{0}", "\u{a0}", " ", "\t", "()", "has(a)",
    ];

    /// When some text parses, its printed form parses back to the same selector.
    fn assert_round_trip(text: &str) -> Result<(), TestCaseError> {
        if let Ok(sel) = Selector::parse(text) {
            let printed = sel.to_string();
            prop_assert_eq!(
                Selector::parse(&printed),
                Ok(sel),
                "{:?} printed as {:?}",
                text,
                printed
            );
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn parse_survives_any_bytes(bytes in vec(any::<u8>(), 0..300)) {
            assert_round_trip(&String::from_utf8_lossy(&bytes))?;
        }

        #[test]
        fn parse_survives_any_string(text in any::<String>()) {
            assert_round_trip(&text)?;
        }

        #[test]
        fn parse_survives_token_soup(tokens in vec(select(SOUP), 0..40), sep in spacing()) {
            assert_round_trip(&tokens.join(sep))?;
        }

        #[test]
        fn generated_selectors_round_trip_and_match(
            ast in ast(),
            sp in spacing(),
            label_sets in label_sets(),
        ) {
            let text = render(&ast, sp);
            let sel = Selector::parse(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let printed = sel.to_string();
            prop_assert_eq!(Selector::parse(&printed), Ok(sel.clone()), "printed as {:?}", printed);
            for labels in &label_sets {
                prop_assert_eq!(sel.matches(labels), eval(&ast, labels), "{} on {:?}", text, labels);
            }
        }

        #[test]
        fn and_is_conjunction(a in ast(), b in ast(), label_sets in label_sets()) {
            let sa = Selector::parse(&render(&a, " ")).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let sb = Selector::parse(&render(&b, " ")).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let both = Selector::and(&sa, &sb);
            prop_assert_eq!(Selector::parse(&both.to_string()), Ok(both.clone()));
            for labels in &label_sets {
                prop_assert_eq!(both.matches(labels), eval(&a, labels) && eval(&b, labels));
            }
        }
    }
}
