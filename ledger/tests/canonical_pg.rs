//! Canonical JSON against the real PostgreSQL: for thousands of random JSON
//! texts, the canonical form of the text the node has equals the canonical
//! form of what `jsonb` prints back, and PostgreSQL reads the canonical
//! form as the same value.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::{Connection, PgConnection};

use audit_ledger::canonical::{canonical_text, write_canonical_text, Canonicalizer};
use audit_ledger::testing::TestDatabase;

const SEED: u64 = 20_261_127;
const DOCS: usize = 10_000;

#[tokio::test]
async fn canonical_form_survives_jsonb() {
    let mut generator = Generator::new(SEED);
    let originals: Vec<String> = (0..DOCS).map(|_| generator.document()).collect();
    let canonicals: Vec<String> = originals
        .iter()
        .map(|text| canonical_text(text).unwrap_or_else(|e| panic!("{e}: {text}")))
        .collect();
    // The single-pass canonicaliser agrees on the texts the node receives.
    let mut scratch = Canonicalizer::new();
    for (original, canonical) in originals.iter().zip(&canonicals) {
        assert_eq!(
            fast(&mut scratch, original),
            *canonical,
            "fast path of {original}"
        );
    }

    let db = TestDatabase::create().await.expect("test database");
    let mut conn = PgConnection::connect(&db.url).await.expect("connect");
    sqlx::raw_sql(
        r#"
        CREATE TABLE canonical_docs (i bigint PRIMARY KEY, doc jsonb, error text);
        -- One bad text must not fail the whole statement: catch it per row.
        CREATE FUNCTION try_jsonb(t text, OUT doc jsonb, OUT error text)
        LANGUAGE plpgsql AS $$
        BEGIN
            doc := t::jsonb;
        EXCEPTION WHEN others THEN
            error := SQLERRM;
        END $$;
        "#,
    )
    .execute(&mut conn)
    .await
    .expect("create table and function");

    sqlx::query(
        "INSERT INTO canonical_docs (i, doc, error)
         SELECT u.i, r.doc, r.error
         FROM unnest($1::text[]) WITH ORDINALITY AS u(t, i), LATERAL try_jsonb(u.t) AS r",
    )
    .bind(&originals)
    .execute(&mut conn)
    .await
    .expect("insert documents");

    let rows: Vec<Row> = sqlx::query_as(
        "SELECT d.i, d.doc::text AS pg_text, d.error,
                c.error AS canonical_error,
                c.doc = d.doc AS same_value,
                c.doc::text = d.doc::text AS same_text
         FROM canonical_docs AS d
         JOIN unnest($1::text[]) WITH ORDINALITY AS u(t, i) USING (i),
         LATERAL try_jsonb(u.t) AS c
         ORDER BY d.i",
    )
    .bind(&canonicals)
    .fetch_all(&mut conn)
    .await
    .expect("read documents back");
    assert_eq!(rows.len(), DOCS);

    let mut checked = 0;
    let mut rejected_nul = 0;
    let mut rejected_range = 0;
    let mut printed_differently = 0;
    let mut literal_sensitive = 0;
    for Row {
        i,
        pg_text,
        error,
        canonical_error,
        same_value,
        same_text,
    } in rows
    {
        let index = usize::try_from(i - 1).unwrap();
        let original = &originals[index];
        let canonical = &canonicals[index];
        let Some(pg_text) = pg_text else {
            let error = error.unwrap_or_default();
            if error.contains("unsupported Unicode escape sequence") {
                rejected_nul += 1;
            } else if error.contains("value overflows numeric format") {
                rejected_range += 1;
            } else {
                panic!("PostgreSQL rejected document {i} unexpectedly: {error}\n{original}");
            }
            continue;
        };
        checked += 1;
        assert_eq!(
            &canonical_text(&pg_text).unwrap(),
            canonical,
            "document {i}: canonical(original) != canonical(jsonb text)\noriginal: {original}\njsonb: {pg_text}"
        );
        // What a verifier runs on what PostgreSQL prints: the same bytes.
        assert_eq!(
            &fast(&mut scratch, &pg_text),
            canonical,
            "document {i}: the fast path differs on the jsonb text\njsonb: {pg_text}"
        );
        let mut appended = b"x".to_vec();
        write_canonical_text(&pg_text, &mut appended).unwrap();
        assert_eq!(&appended[1..], canonical.as_bytes(), "document {i}");
        assert_eq!(
            canonical_error, None,
            "document {i}: PostgreSQL rejects the canonical text {canonical}"
        );
        assert_eq!(
            same_value,
            Some(true),
            "document {i}: canonical text is another jsonb value\noriginal: {original}\ncanonical: {canonical}"
        );
        if same_text != Some(true) {
            printed_differently += 1;
        }
        // Would a canonicaliser that keeps number literals as written have
        // passed? It must not, or this test does not exercise numbers.
        let naive = |t: &str| {
            serde_json::to_string(&serde_json::from_str::<serde_json::Value>(t).unwrap()).unwrap()
        };
        if naive(original) != naive(&pg_text) {
            literal_sensitive += 1;
        }
    }

    let skipped = rejected_nul + rejected_range;
    println!(
        "{checked} documents checked against PostgreSQL; skipped {skipped} it rejects \
         ({rejected_nul} \\u0000, {rejected_range} numeric range); \
         {printed_differently} print differently when stored canonical; \
         {literal_sensitive} would fail with number literals kept"
    );
    assert!(
        rejected_nul > 0 && rejected_range > 0,
        "the generator covers both refusals"
    );
    assert!(skipped * 50 < DOCS, "at most 2% skipped, got {skipped}");
    assert!(
        literal_sensitive * 3 > checked,
        "many documents exercise number normalisation"
    );

    conn.close().await.expect("close");
    db.drop_database().await;
}

/// `Canonicalizer::canonicalize` as a string; panics on error.
fn fast(scratch: &mut Canonicalizer, json: &str) -> String {
    let mut out = Vec::new();
    scratch
        .canonicalize(json, &mut out)
        .unwrap_or_else(|e| panic!("{e}: {json}"));
    String::from_utf8(out).expect("canonical JSON is UTF-8")
}

/// One document as PostgreSQL stored it, and how it read the canonical text.
#[derive(sqlx::FromRow)]
struct Row {
    i: i64,
    /// `None` when PostgreSQL refused the original text, with `error`.
    pg_text: Option<String>,
    error: Option<String>,
    canonical_error: Option<String>,
    same_value: Option<bool>,
    same_text: Option<bool>,
}

/// Random JSON texts: shuffled and duplicate keys, every string escape,
/// astral characters, numbers in every literal form, varied whitespace.
struct Generator {
    rng: StdRng,
}

impl Generator {
    fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    fn document(&mut self) -> String {
        let mut out = String::new();
        self.ws(&mut out);
        let kind = self.rng.gen_range(0..1000);
        match kind {
            // Values PostgreSQL refuses, inside an otherwise valid document.
            0..=4 => self.poisoned(&mut out, "\"ab\\u0000cd\""),
            5..=9 => self.poisoned(&mut out, "1e200000"),
            10..=29 => {
                let depth = self.rng.gen_range(30..=110);
                self.deep(depth, &mut out);
            }
            30..=749 => self.object(0, &mut out),
            750..=899 => self.array(0, &mut out),
            _ => self.value(4, &mut out),
        }
        self.ws(&mut out);
        out
    }

    fn poisoned(&mut self, out: &mut String, poison: &str) {
        out.push_str("{\"ok\":");
        self.object(1, out);
        out.push_str(",\"bad\":");
        out.push_str(poison);
        out.push('}');
    }

    fn deep(&mut self, depth: usize, out: &mut String) {
        let mut closers = Vec::with_capacity(depth);
        for _ in 0..depth {
            if self.rng.gen_bool(0.5) {
                out.push('[');
                self.ws(out);
                closers.push(']');
            } else {
                out.push('{');
                self.string(out);
                out.push(':');
                closers.push('}');
            }
        }
        self.value(5, out);
        for closer in closers.into_iter().rev() {
            self.ws(out);
            out.push(closer);
        }
    }

    fn value(&mut self, depth: usize, out: &mut String) {
        let choice = if depth >= 5 {
            self.rng.gen_range(2..10)
        } else {
            self.rng.gen_range(0..10)
        };
        match choice {
            0 | 1 => self.object(depth + 1, out),
            2 => self.array(depth + 1, out),
            3 | 4 => self.string(out),
            5..=8 => self.number(out),
            _ => out.push_str(["true", "false", "null"][self.rng.gen_range(0..3)]),
        }
    }

    fn object(&mut self, depth: usize, out: &mut String) {
        out.push('{');
        let members = self.rng.gen_range(0..8);
        let mut keys: Vec<String> = Vec::new();
        for i in 0..members {
            if i > 0 {
                out.push(',');
            }
            self.ws(out);
            // Reuse an earlier key, maybe spelt differently: last one wins.
            if !keys.is_empty() && self.rng.gen_bool(0.25) {
                let key = keys[self.rng.gen_range(0..keys.len())].clone();
                self.spell_string(&key, out);
            } else {
                let key = self.key();
                self.spell_string(&key, out);
                keys.push(key);
            }
            self.ws(out);
            out.push(':');
            self.ws(out);
            self.value(depth, out);
            self.ws(out);
        }
        out.push('}');
    }

    fn array(&mut self, depth: usize, out: &mut String) {
        out.push('[');
        let items = self.rng.gen_range(0..6);
        for i in 0..items {
            if i > 0 {
                out.push(',');
            }
            self.ws(out);
            self.value(depth, out);
            self.ws(out);
        }
        out.push(']');
    }

    fn key(&mut self) -> String {
        // Keys that sort differently bytewise, by length (jsonb) and by
        // UTF-16 units.
        const POOL: &[&str] = &[
            "a",
            "b",
            "A",
            "aa",
            "ab",
            "",
            "é",
            "e\u{301}",
            "ß",
            "z",
            "k1",
            "k10",
            "k2",
            "\u{ff61}",
            "\u{1f600}",
            "\u{10000}",
            "id",
            "ID",
            "a b",
            "\"",
            "\\",
            "\n",
        ];
        if self.rng.gen_bool(0.7) {
            POOL[self.rng.gen_range(0..POOL.len())].to_string()
        } else {
            self.text()
        }
    }

    fn string(&mut self, out: &mut String) {
        let text = self.text();
        self.spell_string(&text, out);
    }

    fn text(&mut self) -> String {
        const BMP: &[char] = &[
            'é', 'ß', 'ñ', 'Ω', '中', '日', '\u{80}', '\u{9f}', '\u{a0}', '\u{ad}', '\u{2028}',
            '\u{2029}', '\u{feff}', '\u{fffd}', '\u{ffff}', '\u{e000}', '\u{d7ff}', '\u{301}',
        ];
        const ASTRAL: &[char] = &[
            '😀',
            '𝄞',
            '\u{10000}',
            '\u{10ffff}',
            '\u{1f9ea}',
            '\u{20000}',
        ];
        let len = self.rng.gen_range(0..14);
        (0..len)
            .map(|_| match self.rng.gen_range(0..20) {
                0..=9 => char::from(self.rng.gen_range(0x20u8..0x7f)),
                10..=12 => BMP[self.rng.gen_range(0..BMP.len())],
                13 | 14 => ASTRAL[self.rng.gen_range(0..ASTRAL.len())],
                15 | 16 => char::from(self.rng.gen_range(1u8..0x20)),
                17 => '\u{7f}',
                _ => ['"', '\\', '/'][self.rng.gen_range(0..3)],
            })
            .collect()
    }

    /// Writes `text` as a JSON string, each character spelt raw or escaped
    /// at random (where JSON allows both).
    fn spell_string(&mut self, text: &str, out: &mut String) {
        out.push('"');
        for c in text.chars() {
            let short = match c {
                '"' => Some("\\\""),
                '\\' => Some("\\\\"),
                '/' => Some("\\/"),
                '\u{8}' => Some("\\b"),
                '\u{c}' => Some("\\f"),
                '\n' => Some("\\n"),
                '\r' => Some("\\r"),
                '\t' => Some("\\t"),
                _ => None,
            };
            let must_escape = c < '\u{20}' || c == '"' || c == '\\';
            if !must_escape && self.rng.gen_bool(0.7) {
                out.push(c);
                continue;
            }
            if let Some(short) = short.filter(|_| self.rng.gen_bool(0.5)) {
                out.push_str(short);
                continue;
            }
            let upper = self.rng.gen_bool(0.5);
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                if upper {
                    out.push_str(&format!("\\u{unit:04X}"));
                } else {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
        out.push('"');
    }

    fn number(&mut self, out: &mut String) {
        if self.rng.gen_bool(0.2) {
            out.push('-');
        }
        // Integer part: 0 or digits without a leading zero, sometimes long.
        if self.rng.gen_bool(0.25) {
            out.push('0');
        } else {
            let len = if self.rng.gen_bool(0.05) {
                self.rng.gen_range(20..300)
            } else {
                self.rng.gen_range(1..8)
            };
            out.push(char::from(self.rng.gen_range(b'1'..=b'9')));
            self.digits(len - 1, out);
        }
        if self.rng.gen_bool(0.4) {
            out.push('.');
            if self.rng.gen_bool(0.15) {
                out.push_str(&"0".repeat(self.rng.gen_range(1..6)));
            } else {
                let len = self.rng.gen_range(1..20);
                self.digits(len, out);
                out.push_str(&"0".repeat(self.rng.gen_range(0..4)));
            }
        }
        if self.rng.gen_bool(0.35) {
            out.push(if self.rng.gen_bool(0.5) { 'e' } else { 'E' });
            let negative = self.rng.gen_bool(0.5);
            match self.rng.gen_range(0..3) {
                0 if negative => out.push('-'),
                0 => out.push('+'),
                1 if negative => out.push('-'),
                _ => {}
            }
            out.push_str(&"0".repeat(self.rng.gen_range(0..3)));
            let exponent: u32 = match self.rng.gen_range(0..100) {
                0 => self.rng.gen_range(1000..16000),
                1..=9 => self.rng.gen_range(40..1000),
                _ => self.rng.gen_range(0..40),
            };
            out.push_str(&exponent.to_string());
        }
    }

    fn digits(&mut self, len: usize, out: &mut String) {
        for _ in 0..len {
            // Zeros are common so that trailing and inner zeros occur.
            let d = if self.rng.gen_bool(0.3) {
                b'0'
            } else {
                self.rng.gen_range(b'0'..=b'9')
            };
            out.push(char::from(d));
        }
    }

    fn ws(&mut self, out: &mut String) {
        const WS: &[&str] = &[" ", "\n", "\t", "\r\n", "  ", " \t\n "];
        if self.rng.gen_bool(0.3) {
            out.push_str(WS[self.rng.gen_range(0..WS.len())]);
        }
    }
}
