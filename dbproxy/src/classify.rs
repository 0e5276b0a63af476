//! Statement classifier: decides whether a SQL string surely only reads, and what it does to the
//! session (transactions, session settings, state that pins a session to the primary).
//!
//! It is a conservative lexer, not a parser. It skips comments, quoted strings, quoted identifiers
//! and dollar quotes, then applies rules that settle common reads in well under a microsecond.
//! Anything it cannot settle goes to the primary (invariant 1); the 25006 replay in the session
//! makes a residual miss cost a round trip, never an error. Why not PostgreSQL's own grammar
//! (`pg_query`): a full parse costs 13–78% of a core at the target rates on this machine (see
//! DESIGN.md), and extended-protocol statements are classified once, at Parse, anyway.

use std::collections::HashSet;

/// Where a statement may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// It surely only reads: any healthy standby may run it.
    Standby,
    /// It writes, may write, or could not be classified.
    Primary,
}

/// A transaction isolation level named in BEGIN or SET TRANSACTION.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// None named: the session's `default_transaction_isolation`.
    Default,
    ReadUncommitted,
    ReadCommitted,
    RepeatableRead,
    Serializable,
}

/// What a statement does to the transaction state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxCommand {
    /// Nothing.
    None,
    /// BEGIN / START TRANSACTION, possibly READ ONLY, possibly with an isolation level.
    Begin {
        /// The transaction was declared READ ONLY.
        read_only: bool,
        /// The isolation level it names.
        isolation: Isolation,
    },
    /// SET TRANSACTION (not SET SESSION CHARACTERISTICS, a session setting): it must run
    /// before the transaction's first query when it changes the isolation level or imports a
    /// snapshot.
    SetTransaction {
        /// The isolation level it names.
        isolation: Isolation,
        /// SET TRANSACTION SNAPSHOT.
        snapshot: bool,
    },
    /// COMMIT / END / ROLLBACK / ABORT / PREPARE TRANSACTION.
    End,
}

/// The isolation level named by `ISOLATION LEVEL ...` in `t`.
fn isolation_of(t: &[Tok<'_>]) -> Isolation {
    let Some(at) = t.windows(2).position(|w| {
        w[0].word().is_some_and(|a| a.eq_ignore_ascii_case("isolation"))
            && w[1].word().is_some_and(|b| b.eq_ignore_ascii_case("level"))
    }) else {
        return Isolation::Default;
    };
    let w = |i: usize, k: &str| word_at(t, at + 2 + i, k);
    if w(0, "serializable") {
        Isolation::Serializable
    } else if w(0, "repeatable") {
        Isolation::RepeatableRead
    } else if w(0, "read") && w(1, "committed") {
        Isolation::ReadCommitted
    } else if w(0, "read") && w(1, "uncommitted") {
        Isolation::ReadUncommitted
    } else {
        // Unknown to this lexer: PostgreSQL will refuse it; treat it as the strictest.
        Isolation::Serializable
    }
}

/// The verdict on one SQL string (which may hold several statements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classified {
    /// Where it may run.
    pub target: Target,
    /// Its effect on the transaction (the last such statement in a multi-statement string).
    pub tx: TxCommand,
    /// It creates state only the primary connection will have (temporary tables, LISTEN, session
    /// advisory locks, WITH HOLD cursors, SQL-level PREPARE): the session must stay on the primary.
    pub pins_session: bool,
    /// It changes session settings (SET, RESET, DISCARD, set_config) that every backend connection of
    /// the session must share.
    pub session_set: bool,
    /// It makes, releases or rolls back to a savepoint (which decides whether earlier SETs hold).
    pub savepoint: bool,
    /// It may be a COPY FROM STDIN: the server may switch to copy-in mode, where any message but
    /// the client's data is an error, so nothing may be pipelined behind it.
    pub copy_in: bool,
    /// It is exactly one statement (as the lexer splits the text at its semicolons).
    pub single: bool,
}

/// The most statements [`Classifier::steps`] lists for one string.
pub const MAX_STEPS: usize = 10_000;

/// What one statement does to the session's settings and its transaction: what a session needs
/// to follow which SET statements stay in force (see `settings.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A session-level SET, RESET, DISCARD, or a SELECT calling `set_config`: its text, which is
    /// what other connections of the session replay if it holds.
    Set(String),
    /// BEGIN / START TRANSACTION.
    Begin,
    /// COMMIT / END / PREPARE TRANSACTION (`chain`: AND CHAIN opens the next transaction).
    Commit {
        /// AND CHAIN.
        chain: bool,
    },
    /// ROLLBACK / ABORT.
    Rollback {
        /// AND CHAIN.
        chain: bool,
    },
    /// SAVEPOINT name (names folded as PostgreSQL folds identifiers).
    Savepoint(String),
    /// RELEASE [SAVEPOINT] name.
    Release(String),
    /// ROLLBACK [WORK | TRANSACTION] TO [SAVEPOINT] name.
    RollbackTo(String),
    /// Anything else (SET LOCAL included: it never outlives its transaction).
    Other,
    /// A `set_config` call whose parameters cannot be written out as literals (binary values of
    /// a type not known): what it sets cannot be replayed elsewhere.
    Unknown,
}

impl Classified {
    const PRIMARY: Classified = Classified {
        target: Target::Primary,
        tx: TxCommand::None,
        pins_session: false,
        session_set: false,
        savepoint: false,
        copy_in: false,
        single: false,
    };
    const READ: Classified = Classified {
        target: Target::Standby,
        ..Classified::PRIMARY
    };
}

/// Functions known to have no side effects and to work on a hot standby.
const READ_ONLY_FUNCTIONS: &[&str] = &[
    "abs",
    "age",
    "array_agg",
    "array_length",
    "array_lower",
    "array_position",
    "array_to_json",
    "array_to_string",
    "array_upper",
    "ascii",
    "avg",
    "bit_length",
    "bool_and",
    "bool_or",
    "btrim",
    "cardinality",
    "ceil",
    "ceiling",
    "char_length",
    "character_length",
    "chr",
    "clock_timestamp",
    "col_description",
    "concat",
    "concat_ws",
    "count",
    "cume_dist",
    "current_database",
    "current_schema",
    "current_schemas",
    "current_setting",
    "date_bin",
    "date_part",
    "date_trunc",
    "decode",
    "degrees",
    "dense_rank",
    "div",
    "encode",
    "every",
    "exp",
    "first_value",
    "floor",
    "format",
    "format_type",
    "gen_random_uuid",
    "generate_series",
    "generate_subscripts",
    "has_database_privilege",
    "has_schema_privilege",
    "has_table_privilege",
    "host",
    "inet_client_addr",
    "inet_client_port",
    "inet_server_addr",
    "inet_server_port",
    "initcap",
    "isfinite",
    "json_agg",
    "json_array_elements",
    "json_array_elements_text",
    "json_array_length",
    "json_build_array",
    "json_build_object",
    "json_each",
    "json_each_text",
    "json_extract_path",
    "json_extract_path_text",
    "json_object_agg",
    "json_object_keys",
    "json_typeof",
    "jsonb_agg",
    "jsonb_array_elements",
    "jsonb_array_elements_text",
    "jsonb_array_length",
    "jsonb_build_array",
    "jsonb_build_object",
    "jsonb_each",
    "jsonb_each_text",
    "jsonb_extract_path",
    "jsonb_extract_path_text",
    "jsonb_object_agg",
    "jsonb_object_keys",
    "jsonb_path_query",
    "jsonb_pretty",
    "jsonb_set",
    "jsonb_strip_nulls",
    "jsonb_typeof",
    "justify_days",
    "justify_hours",
    "justify_interval",
    "lag",
    "last_value",
    "lead",
    "left",
    "length",
    "ln",
    "log",
    "lower",
    "lpad",
    "ltrim",
    "make_date",
    "make_interval",
    "make_time",
    "make_timestamp",
    "make_timestamptz",
    "max",
    "md5",
    "min",
    "mod",
    "mode",
    "now",
    "nth_value",
    "ntile",
    "num_nulls",
    "num_nonnulls",
    "obj_description",
    "octet_length",
    "percent_rank",
    "percentile_cont",
    "percentile_disc",
    "pg_column_size",
    "pg_database_size",
    "pg_get_userbyid",
    "pg_indexes_size",
    "pg_is_in_recovery",
    "pg_last_wal_receive_lsn",
    "pg_last_wal_replay_lsn",
    "pg_last_xact_replay_timestamp",
    "pg_postmaster_start_time",
    "pg_relation_size",
    "pg_size_pretty",
    "pg_sleep",
    "pg_table_size",
    "pg_total_relation_size",
    "pg_typeof",
    "pg_wal_lsn_diff",
    "pi",
    "power",
    "quote_ident",
    "quote_literal",
    "quote_nullable",
    "radians",
    "random",
    "rank",
    "regexp_match",
    "regexp_matches",
    "regexp_replace",
    "regexp_split_to_array",
    "regexp_split_to_table",
    "repeat",
    "replace",
    "reverse",
    "right",
    "round",
    "row_number",
    "row_to_json",
    "rpad",
    "rtrim",
    "sha224",
    "sha256",
    "sha384",
    "sha512",
    "sign",
    "split_part",
    "sqrt",
    "starts_with",
    "statement_timestamp",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "string_agg",
    "string_to_array",
    "strpos",
    "sum",
    "timeofday",
    "to_char",
    "to_date",
    "to_hex",
    "to_json",
    "to_jsonb",
    "to_number",
    "to_timestamp",
    "transaction_timestamp",
    "translate",
    "trunc",
    "unnest",
    "upper",
    "var_pop",
    "var_samp",
    "variance",
    "version",
    "width_bucket",
];

/// Views whose rows are the state of the server that answers, not of the cluster: a standby's
/// are empty or its own (prepared transactions, sessions, locks, statistics, settings in force).
const NODE_LOCAL_RELATIONS: &[&str] = &[
    "pg_backend_memory_contexts",
    "pg_cursors",
    "pg_file_settings",
    "pg_hba_file_rules",
    "pg_ident_file_mappings",
    "pg_locks",
    "pg_prepared_statements",
    "pg_prepared_xacts",
    "pg_replication_origin_status",
    "pg_replication_slots",
    "pg_sequences",
    "pg_settings",
    "pg_shmem_allocations",
];

/// Prefixes of node-local views: the cumulative statistics (`pg_stat_activity`,
/// `pg_stat_user_tables`, `pg_statio_*`, `pg_stat_progress_*`, ...). `pg_stats` and
/// `pg_statistic`, the planner's replicated statistics, do not match.
const NODE_LOCAL_PREFIXES: &[&str] = &["pg_stat_", "pg_statio_"];

/// Settings whose value depends on the server's role: always `on` on a hot standby.
const NODE_LOCAL_SETTINGS: &[&str] = &[
    "default_transaction_read_only",
    "in_hot_standby",
    "transaction_read_only",
];

/// Whether a name (unquoted or quoted) is a node-local view.
fn is_node_local(name: &[u8]) -> bool {
    NODE_LOCAL_RELATIONS
        .iter()
        .any(|r| name.eq_ignore_ascii_case(r.as_bytes()))
        || NODE_LOCAL_PREFIXES
            .iter()
            .any(|p| name.len() > p.len() && name[..p.len()].eq_ignore_ascii_case(p.as_bytes()))
}

/// Whether a setting name is one whose value depends on the server's role.
fn is_node_local_setting(name: &[u8]) -> bool {
    NODE_LOCAL_SETTINGS
        .iter()
        .any(|s| name.eq_ignore_ascii_case(s.as_bytes()))
}

/// Whether the `current_setting` at `i` is called with a literal name of a setting every node
/// of the session shares; a computed name or a role-dependent one goes to the primary.
fn reads_shared_setting(t: &[Tok<'_>], i: usize) -> bool {
    if t.get(i + 1) != Some(&Tok::Punct(b'(')) {
        // A column or alias of that name, not a call.
        return true;
    }
    match t.get(i + 2) {
        Some(Tok::Str(name)) => {
            !is_node_local_setting(name) && matches!(t.get(i + 3), Some(Tok::Punct(b')' | b',' | b':')))
        }
        _ => false,
    }
}

/// Keywords and type names that may stand before `(` without being a function call.
const NOT_CALLS: &[&str] = &[
    "all",
    "and",
    "any",
    "array",
    "as",
    "between",
    "bigint",
    "bit",
    "boolean",
    "by",
    "case",
    "cast",
    "char",
    "character",
    "coalesce",
    "cube",
    "date",
    "decimal",
    "distinct",
    "double",
    "else",
    "except",
    "exists",
    "extract",
    "fetch",
    "filter",
    "float",
    "from",
    "greatest",
    "group",
    "grouping",
    "groups",
    "having",
    "ilike",
    "in",
    "int",
    "integer",
    "intersect",
    "interval",
    "is",
    "join",
    "json",
    "jsonb",
    "lateral",
    "least",
    "like",
    "limit",
    "not",
    "nullif",
    "numeric",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "over",
    "overlay",
    "partition",
    "position",
    "precision",
    "range",
    "real",
    "recursive",
    "rollup",
    "row",
    "rows",
    "select",
    "sets",
    "similar",
    "smallint",
    "some",
    "substring",
    "table",
    "tablesample",
    "text",
    "then",
    "time",
    "timestamp",
    "timestamptz",
    "trim",
    "union",
    "uuid",
    "values",
    "varchar",
    "varying",
    "when",
    "where",
    "window",
    "with",
    "within",
    "bytea",
    "numrange",
    "int4range",
    "tsrange",
];

/// Decides where statements run; built once from the configuration.
#[derive(Debug, Clone)]
pub struct Classifier {
    /// Lower-case names (`name` or `schema.name`) of functions trusted to only read.
    read_only: HashSet<Vec<u8>>,
}

impl Default for Classifier {
    fn default() -> Self {
        Classifier::new(&[])
    }
}

/// A client encoding, as far as lexing SQL in it is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// An ASCII byte is always that ASCII character (UTF-8, the LATIN and WIN single-byte
    /// encodings, EUC_*, KOI8, ...: every encoding PostgreSQL can use on the server side).
    #[default]
    AsciiSafe,
    /// A multi-byte character may end in an ASCII byte such as `\` (SJIS, SHIFT_JIS_2004, BIG5,
    /// GBK, UHC, GB18030, JOHAB: the client-only encodings).
    AsciiUnsafe,
}

impl Encoding {
    /// The encoding a `client_encoding` name (as a ParameterStatus reports it, or an alias)
    /// stands for.
    pub fn from_name(name: &str) -> Encoding {
        // PostgreSQL ignores case and any non-alphanumeric character in encoding names.
        let mut key = [0u8; 24];
        let mut n = 0;
        for c in name.bytes().filter(u8::is_ascii_alphanumeric) {
            if n == key.len() {
                return Encoding::AsciiSafe;
            }
            key[n] = c.to_ascii_lowercase();
            n += 1;
        }
        const UNSAFE: &[&[u8]] = &[
            b"sjis",
            b"shiftjis",
            b"mskanji",
            b"win932",
            b"windows932",
            b"shiftjis2004",
            b"big5",
            b"win950",
            b"windows950",
            b"gbk",
            b"win936",
            b"windows936",
            b"uhc",
            b"win949",
            b"windows949",
            b"gb18030",
            b"johab",
        ];
        if UNSAFE.contains(&&key[..n]) {
            Encoding::AsciiUnsafe
        } else {
            Encoding::AsciiSafe
        }
    }

    /// Whether the lexer may read `sql` byte by byte.
    fn lexable(self, sql: &[u8]) -> bool {
        self == Encoding::AsciiSafe || sql.is_ascii()
    }
}

/// A name's bytes as a `String`, one character per byte: different byte strings stay different
/// whatever the encoding (names are only compared with each other).
fn name_text(b: &[u8]) -> String {
    b.iter().map(|&c| char::from(c)).collect()
}

/// Relation names (`pg_class.relname`, as stored) of one database, for [`Classifier::classify_with`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Relations(HashSet<Vec<u8>>);

impl Relations {
    /// The set of these names.
    pub fn new(names: impl IntoIterator<Item = Vec<u8>>) -> Relations {
        Relations(names.into_iter().collect())
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether token `t` names one of them: a quoted name as written, an unquoted one folded to
    /// lower case as PostgreSQL folds it (without allocating: a name is at most 63 bytes). A
    /// column or alias of the same name also matches, which only sends a read to the primary.
    fn named(&self, t: &Tok<'_>) -> bool {
        match t {
            Tok::Quoted(q) => self.0.contains(*q),
            Tok::Word(w) if w.0.len() <= 63 => {
                let mut buf = [0u8; 63];
                let folded = &mut buf[..w.0.len()];
                folded.copy_from_slice(w.0);
                folded.make_ascii_lowercase();
                self.0.contains(&folded[..])
            }
            _ => false,
        }
    }
}

/// Whether token `i` is the keyword `w` (any case).
fn word_at(t: &[Tok<'_>], i: usize, w: &str) -> bool {
    t.get(i)
        .and_then(Tok::word)
        .is_some_and(|x| x.eq_ignore_ascii_case(w))
}

/// Whether any token is the keyword `w` (any case).
fn has_word(t: &[Tok<'_>], w: &str) -> bool {
    t.iter()
        .any(|x| x.word().is_some_and(|x| x.eq_ignore_ascii_case(w)))
}

impl Classifier {
    /// A classifier that also trusts the given functions (lower-case, optionally schema-qualified) to
    /// only read; pgpool-II calls this list `read_only_function_list`.
    pub fn new(read_only_functions: &[String]) -> Self {
        let mut read_only: HashSet<Vec<u8>> = READ_ONLY_FUNCTIONS
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect();
        read_only.extend(
            read_only_functions
                .iter()
                .map(|f| f.trim().to_ascii_lowercase().into_bytes()),
        );
        Classifier { read_only }
    }

    /// Classifies a SQL string (simple-protocol Query text or an extended-protocol Parse) given
    /// as UTF-8 text.
    pub fn classify(&self, sql: &str) -> Classified {
        self.classify_bytes(sql.as_bytes(), Encoding::AsciiSafe)
    }

    /// Classifies a SQL string given as the bytes the client sent, in its `client_encoding`.
    /// In an encoding where a multi-byte character may hold ASCII bytes (SJIS, BIG5, ...), a
    /// string with any non-ASCII byte goes to the primary and pins the session there: the
    /// lexer could take such a byte for a quote or a backslash and misjudge where a string
    /// ends, so it cannot tell a SET or a LISTEN either.
    pub fn classify_bytes(&self, sql: &[u8], encoding: Encoding) -> Classified {
        self.classify_with(sql, encoding, &Relations::default())
    }

    /// [`Classifier::classify_bytes`], where a read that names one of `unlogged` (a relation a
    /// standby refuses to read: `cannot access temporary or unlogged relations during
    /// recovery`) goes to the primary.
    pub fn classify_with(&self, sql: &[u8], encoding: Encoding, unlogged: &Relations) -> Classified {
        if !encoding.lexable(sql) {
            // It may be a SET, a LISTEN, anything: the session stays on the primary.
            return Classified {
                pins_session: true,
                ..Classified::PRIMARY
            };
        }
        let mut tokens = Tokens::new();
        if lex(sql, &mut tokens).is_err() {
            return Classified::PRIMARY;
        }
        let mut out = Classified::READ;
        let mut count = 0;
        for stmt in tokens
            .split(|t| matches!(t, Tok::Semi(_)))
            .filter(|s| !s.is_empty())
        {
            count += 1;
            let c = self.statement(stmt);
            if c.target == Target::Primary {
                out.target = Target::Primary;
            }
            if c.tx != TxCommand::None {
                out.tx = c.tx;
            }
            out.pins_session |= c.pins_session;
            out.session_set |= c.session_set;
            out.savepoint |= c.savepoint;
            out.copy_in |= c.copy_in;
        }
        if count == 0 {
            // An empty query: harmless anywhere, but there is nothing to balance either.
            out.target = Target::Primary;
        }
        out.single = count == 1;
        if out.target == Target::Standby && !unlogged.is_empty() && tokens.iter().any(|t| unlogged.named(t)) {
            out.target = Target::Primary;
        }
        out
    }

    /// The statements of `sql` in order, as PostgreSQL would split them, each with its effect on
    /// session settings and the transaction; `None` when the split is not sure: an unterminated
    /// quote, a `;` inside parentheses (CREATE RULE action lists), or a SQL-standard function body
    /// (`BEGIN ATOMIC ... END`), whose semicolons do not end the statement; also past
    /// [`MAX_STEPS`] statements, so the list stays small whatever the client sends.
    pub fn steps(&self, sql: &str) -> Option<Vec<Step>> {
        self.steps_bytes(sql.as_bytes(), Encoding::AsciiSafe)
    }

    /// [`Classifier::steps`] on the bytes the client sent in its `client_encoding`; `None` also
    /// when a SET's text is not UTF-8 (it stays on the primary rather than be replayed garbled)
    /// or when the encoding cannot be lexed safely (see [`Classifier::classify_bytes`]).
    pub fn steps_bytes(&self, sql: &[u8], encoding: Encoding) -> Option<Vec<Step>> {
        if !encoding.lexable(sql) {
            return None;
        }
        let mut tokens = Tokens::new();
        lex(sql, &mut tokens).ok()?;
        let mut out = Vec::new();
        let mut depth = 0usize;
        let (mut from, mut start) = (0, 0);
        for (i, tok) in tokens.iter().enumerate() {
            match tok {
                Tok::Punct(b'(') => depth += 1,
                Tok::Punct(b')') => depth = depth.saturating_sub(1),
                Tok::Semi(_) if depth > 0 => return None,
                _ => {}
            }
            let end = match tok {
                Tok::Semi(at) => *at,
                _ if i + 1 == tokens.len() => sql.len(),
                _ => continue,
            };
            let t = &tokens[from..if matches!(tok, Tok::Semi(_)) { i } else { i + 1 }];
            if !t.is_empty() {
                if out.len() == MAX_STEPS {
                    return None;
                }
                out.push(self.step(t, sql.get(start..end)?.trim_ascii())?);
            }
            from = i + 1;
            start = end + 1;
        }
        Some(out)
    }

    /// The [`Step`] of one statement (`None`: a function body that cannot be split).
    fn step(&self, t: &[Tok<'_>], text: &[u8]) -> Option<Step> {
        let kw = |i: usize, w: &str| word_at(t, i, w);
        let has = |w: &str| has_word(t, w);
        let chain = t.windows(2).any(|w| {
            w[0].word().is_some_and(|a| a.eq_ignore_ascii_case("and"))
                && w[1].word().is_some_and(|b| b.eq_ignore_ascii_case("chain"))
        });
        // The savepoint name at `i`, folded like an identifier.
        let name = |i: usize| match t.get(i) {
            Some(Tok::Word(w)) => name_text(&w.folded()),
            Some(Tok::Quoted(q)) => name_text(q).replace("\"\"", "\""),
            _ => String::new(),
        };
        let Some(first) = t.first().and_then(Tok::word) else {
            return Some(Step::Other);
        };
        let mut buf = [0; 32];
        Some(match lowered(first, &mut buf) {
            "create" if has("atomic") => return None,
            "begin" | "start" => Step::Begin,
            "commit" | "end" if !kw(1, "prepared") => Step::Commit { chain },
            "prepare" if kw(1, "transaction") => Step::Commit { chain: false },
            "abort" => Step::Rollback { chain },
            "rollback" if kw(1, "prepared") => Step::Other,
            "rollback" => match t
                .iter()
                .position(|x| x.word().is_some_and(|w| w.eq_ignore_ascii_case("to")))
            {
                Some(to) => Step::RollbackTo(name(to + 1 + kw(to + 1, "savepoint") as usize)),
                None => Step::Rollback { chain },
            },
            "savepoint" => Step::Savepoint(name(1)),
            "release" => Step::Release(name(1 + kw(1, "savepoint") as usize)),
            _ if self.statement(t).session_set => Step::Set(std::str::from_utf8(text).ok()?.to_string()),
            _ => Step::Other,
        })
    }

    fn statement(&self, t: &[Tok<'_>]) -> Classified {
        let Some(first) = t.first().and_then(Tok::word) else {
            // Starts with a parenthesis, e.g. `(SELECT 1) UNION (SELECT 2)`: check it like a SELECT
            // when a query starts inside; anything else (found by fuzzing: `( group ...) CREATE`)
            // is not a query a standby may answer.
            let opens = t.iter().take_while(|x| matches!(x, Tok::Punct(b'('))).count();
            let query = t.get(opens).and_then(Tok::word).is_some_and(|w| {
                ["select", "values", "table", "with"]
                    .iter()
                    .any(|k| w.eq_ignore_ascii_case(k))
            });
            return if opens > 0 && query {
                self.read_like(t)
            } else {
                Classified::PRIMARY
            };
        };
        let kw = |i: usize, w: &str| word_at(t, i, w);
        let has = |w: &str| has_word(t, w);
        let mut buf = [0; 32];
        match lowered(first, &mut buf) {
            "show"
                if t.get(1).is_some_and(|n| match n {
                    Tok::Word(w) => w.eq_ignore_ascii_case("all") || is_node_local_setting(w.0),
                    Tok::Quoted(q) => is_node_local_setting(q),
                    _ => true,
                }) =>
            {
                Classified::PRIMARY
            }
            "select" | "values" | "table" | "with" | "show" => self.read_like(t),
            "explain" => {
                // EXPLAIN ANALYZE runs the statement; either way the explained statement decides.
                let mut i = 1;
                if t.get(i) == Some(&Tok::Punct(b'(')) {
                    i = matching_paren(t, i) + 1;
                }
                const OPTIONS: &[&str] = &["analyze", "analyse", "verbose"];
                while t
                    .get(i)
                    .and_then(Tok::word)
                    .is_some_and(|w| OPTIONS.iter().any(|o| w.eq_ignore_ascii_case(o)))
                {
                    i += 1;
                }
                let inner = t.get(i..).unwrap_or(&[]);
                let readable = inner.first().and_then(Tok::word).is_some_and(|w| {
                    ["select", "values", "table", "with"]
                        .iter()
                        .any(|k| w.eq_ignore_ascii_case(k))
                });
                if readable {
                    self.read_like(inner)
                } else {
                    Classified::PRIMARY
                }
            }
            "begin" | "start" => {
                let read_only = t.windows(2).any(|w| {
                    w[0].word().is_some_and(|a| a.eq_ignore_ascii_case("read"))
                        && w[1].word().is_some_and(|b| b.eq_ignore_ascii_case("only"))
                });
                Classified {
                    tx: TxCommand::Begin {
                        read_only,
                        isolation: isolation_of(t),
                    },
                    ..Classified::PRIMARY
                }
            }
            "commit" | "end" | "abort" if !kw(1, "prepared") => Classified {
                tx: TxCommand::End,
                ..Classified::PRIMARY
            },
            "rollback" if !has("to") && !kw(1, "prepared") => Classified {
                tx: TxCommand::End,
                ..Classified::PRIMARY
            },
            "rollback" | "savepoint" | "release" if !kw(1, "prepared") => Classified {
                savepoint: true,
                ..Classified::PRIMARY
            },
            "prepare" if kw(1, "transaction") => Classified {
                tx: TxCommand::End,
                ..Classified::PRIMARY
            },
            // SQL-level prepared statements live on one backend connection.
            "prepare" => Classified {
                pins_session: true,
                ..Classified::PRIMARY
            },
            "set" if kw(1, "transaction") => Classified {
                tx: TxCommand::SetTransaction {
                    isolation: isolation_of(t),
                    snapshot: kw(2, "snapshot"),
                },
                ..Classified::PRIMARY
            },
            "set" if kw(1, "local") || kw(1, "constraints") => Classified::PRIMARY,
            "set" | "reset" | "discard" => Classified {
                session_set: true,
                ..Classified::PRIMARY
            },
            "listen" => Classified {
                pins_session: true,
                ..Classified::PRIMARY
            },
            "create"
                if kw(1, "temp")
                    || kw(1, "temporary")
                    || (kw(1, "local") && (kw(2, "temp") || kw(2, "temporary"))) =>
            {
                Classified {
                    pins_session: true,
                    ..Classified::PRIMARY
                }
            }
            "declare" if has("hold") => Classified {
                pins_session: true,
                ..Classified::PRIMARY
            },
            "copy" => self.copy(t),
            _ => Classified::PRIMARY,
        }
    }

    /// SELECT / VALUES / TABLE / WITH / SHOW: a read unless something in it writes or might.
    fn read_like(&self, t: &[Tok<'_>]) -> Classified {
        let mut out = Classified::READ;
        for (i, tok) in t.iter().enumerate() {
            let next = t.get(i + 1);
            match tok {
                Tok::Word(w) => {
                    let is = |k: &str| w.eq_ignore_ascii_case(k);
                    if is_node_local(w.0) {
                        out.target = Target::Primary;
                    }
                    if is("current_setting") && !reads_shared_setting(t, i) {
                        out.target = Target::Primary;
                    }
                    if is("insert") || is("update") || is("delete") || is("merge") {
                        // Writing CTEs, and `FOR UPDATE`.
                        return Classified {
                            pins_session: out.pins_session,
                            ..Classified::PRIMARY
                        };
                    }
                    if is("for") {
                        let lock = next.and_then(Tok::word).is_some_and(|n| {
                            ["update", "share", "no", "key"]
                                .iter()
                                .any(|k| n.eq_ignore_ascii_case(k))
                        });
                        if lock {
                            return Classified::PRIMARY;
                        }
                    }
                    if is("into") {
                        // SELECT INTO creates a table; INTO TEMP one only this connection sees.
                        let temp = t[i + 1..].iter().take(3).any(|x| {
                            x.word().is_some_and(|n| {
                                n.eq_ignore_ascii_case("temp") || n.eq_ignore_ascii_case("temporary")
                            })
                        });
                        return Classified {
                            pins_session: temp,
                            ..Classified::PRIMARY
                        };
                    }
                    if next == Some(&Tok::Punct(b'('))
                        && !is_name_with_columns(t, i)
                        && !self.call_is_read_only(t, i)
                    {
                        let lower = w.folded();
                        let contains = |n: &[u8]| lower.windows(n.len()).any(|x| x == n);
                        let advisory =
                            lower.starts_with(b"pg_advisory_") || lower.starts_with(b"pg_try_advisory_");
                        if advisory && !contains(b"xact") && !contains(b"unlock") {
                            out.pins_session = true;
                        }
                        if lower == b"set_config" {
                            out.session_set = true;
                        }
                        out.target = Target::Primary;
                    }
                }
                // A quoted name called as a function: only an allow-listed one may read.
                Tok::Quoted(_) if next == Some(&Tok::Punct(b'(')) && !self.call_is_read_only(t, i) => {
                    out.target = Target::Primary;
                }
                Tok::Quoted(q) if is_node_local(q) => out.target = Target::Primary,
                _ => {}
            }
        }
        out
    }

    /// Whether the word at `i`, followed by `(`, is a keyword, a type, or a read-only function.
    fn call_is_read_only(&self, t: &[Tok<'_>], i: usize) -> bool {
        let name = match &t[i] {
            Tok::Word(w) => w.folded(),
            Tok::Quoted(q) => q.to_vec(),
            _ => return false,
        };
        // A schema-qualified call: `schema.name(`.
        let schema = if i >= 2 && t[i - 1] == Tok::Punct(b'.') {
            match &t[i - 2] {
                Tok::Word(s) => Some(s.folded()),
                Tok::Quoted(s) => Some(s.to_vec()),
                _ => None,
            }
        } else {
            None
        };
        match schema {
            None => NOT_CALLS.iter().any(|k| k.as_bytes() == name) || self.read_only.contains(&name),
            Some(s) if s == b"pg_catalog" => self.read_only.contains(&name),
            Some(mut s) => {
                s.push(b'.');
                s.extend_from_slice(&name);
                self.read_only.contains(&s)
            }
        }
    }

    /// COPY ... TO reads; COPY ... FROM writes.
    fn copy(&self, t: &[Tok<'_>]) -> Classified {
        let i = 1;
        if t.get(i) == Some(&Tok::Punct(b'(')) {
            // COPY (query) TO ...: the query decides.
            let close = matching_paren(t, i);
            let inner = &t[i + 1..close.min(t.len())];
            let is_to = t
                .get(close + 1)
                .and_then(Tok::word)
                .is_some_and(|w| w.eq_ignore_ascii_case("to"));
            return if is_to {
                self.read_like(inner)
            } else {
                Classified {
                    copy_in: true,
                    ..Classified::PRIMARY
                }
            };
        }
        let is_to = t
            .iter()
            .any(|x| x.word().is_some_and(|w| w.eq_ignore_ascii_case("to")));
        let is_from = t
            .iter()
            .any(|x| x.word().is_some_and(|w| w.eq_ignore_ascii_case("from")));
        if is_to && !is_from {
            Classified::READ
        } else {
            Classified {
                copy_in: true,
                ..Classified::PRIMARY
            }
        }
    }
}

/// Index of the `)` matching the `(` at `open` (or the end of the tokens when unbalanced).
fn matching_paren(t: &[Tok<'_>], open: usize) -> usize {
    let mut depth = 0usize;
    for (j, tok) in t.iter().enumerate().skip(open) {
        match tok {
            Tok::Punct(b'(') => depth += 1,
            Tok::Punct(b')') => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return j;
                }
            }
            _ => {}
        }
    }
    t.len()
}

/// Whether the word at `i`, followed by `(`, names columns rather than calling a function:
/// a CTE (`name (a, b) AS (...)`) or an alias (`AS t (a, b)`).
fn is_name_with_columns(t: &[Tok<'_>], i: usize) -> bool {
    let after_as = i >= 1 && t[i - 1].word().is_some_and(|w| w.eq_ignore_ascii_case("as"));
    if after_as {
        return true;
    }
    let close = matching_paren(t, i + 1);
    let is_as = t
        .get(close + 1)
        .and_then(Tok::word)
        .is_some_and(|w| w.eq_ignore_ascii_case("as"));
    let body = match t.get(close + 2) {
        Some(Tok::Punct(b'(')) => true,
        Some(Tok::Word(w)) => w.eq_ignore_ascii_case("materialized") || w.eq_ignore_ascii_case("not"),
        _ => false,
    };
    is_as && body
}

/// A token. Literals and comments are dropped; only what the rules look at is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok<'a> {
    /// An unquoted identifier or keyword (case as written).
    Word(Kw<'a>),
    /// A double-quoted identifier (case preserved, quotes removed, `""` left doubled).
    Quoted(&'a [u8]),
    /// A plain single-quoted string: its body as written (`''` left doubled).
    Str(&'a [u8]),
    /// Any other literal (escape string, number, dollar-quoted string): its value does not matter.
    Literal,
    /// A parameter `$n`, with the byte range it takes in the text.
    Param {
        /// Its number (1 for `$1`); 0 when too large to be one.
        n: u32,
        /// Where it starts (a message is far below 4 GiB).
        at: u32,
        /// Where it ends.
        end: u32,
    },
    /// `;` outside any quoting, with its byte offset.
    Semi(usize),
    /// Any other punctuation byte.
    Punct(u8),
}

/// The bytes of an unquoted word, in the client's encoding; keywords are ASCII in every encoding
/// PostgreSQL supports, so they are compared byte-wise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Kw<'a>(&'a [u8]);

impl<'a> Kw<'a> {
    /// Whether it is the ASCII keyword `k`, in any case.
    fn eq_ignore_ascii_case(self, k: &str) -> bool {
        self.0.eq_ignore_ascii_case(k.as_bytes())
    }

    /// Its bytes with ASCII letters lower-cased, as PostgreSQL folds an unquoted name.
    fn folded(self) -> Vec<u8> {
        self.0.to_ascii_lowercase()
    }
}

impl<'a> Tok<'a> {
    fn word(&self) -> Option<Kw<'a>> {
        match self {
            Tok::Word(w) => Some(*w),
            _ => None,
        }
    }
}

/// The bytes that continue an unquoted identifier: letters, digits, `_`, `$`, and every byte of
/// a multi-byte character.
static IDENT: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80;
        c += 1;
    }
    t
};

/// A statement string's tokens; most statements fit inline, so lexing one allocates nothing.
type Tokens<'a> = smallvec::SmallVec<[Tok<'a>; 32]>;

/// `w` in ASCII lower case, written in `buf` when it fits (every keyword does); "" otherwise.
fn lowered<'b>(w: Kw<'_>, buf: &'b mut [u8; 32]) -> &'b str {
    let Some(dst) = buf.get_mut(..w.0.len()) else {
        return "";
    };
    dst.copy_from_slice(w.0);
    dst.make_ascii_lowercase();
    std::str::from_utf8(dst).unwrap_or("")
}

/// Splits SQL (bytes in an encoding where an ASCII byte is always that ASCII character) into
/// tokens; `Err` on an unterminated quote or comment (it goes to the primary).
fn lex<'a>(b: &'a [u8], out: &mut Tokens<'a>) -> Result<(), ()> {
    out.clear();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b' ' | b'\t' | b'\n' | b'\r' | 0x0c => i += 1,
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                // Block comments nest in PostgreSQL.
                let mut depth = 0usize;
                loop {
                    if i + 1 >= b.len() {
                        return Err(());
                    }
                    if b[i] == b'/' && b[i + 1] == b'*' {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b[i + 1] == b'/' {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'\'' => {
                let start = i + 1;
                i = skip_string(b, start, false)?;
                out.push(Tok::Str(&b[start..i - 1]));
            }
            b'"' => {
                let start = i + 1;
                i = start;
                loop {
                    match b.get(i) {
                        None => return Err(()),
                        Some(b'"') if b.get(i + 1) == Some(&b'"') => i += 2,
                        Some(b'"') => break,
                        Some(_) => i += 1,
                    }
                }
                out.push(Tok::Quoted(&b[start..i]));
                i += 1;
            }
            b'$' => {
                // `$1` is a parameter; `$tag$...$tag$` a dollar-quoted string.
                let mut j = i + 1;
                if b.get(j).is_some_and(u8::is_ascii_digit) {
                    while b.get(j).is_some_and(u8::is_ascii_digit) {
                        j += 1;
                    }
                    let n = std::str::from_utf8(&b[i + 1..j])
                        .ok()
                        .and_then(|d| d.parse().ok())
                        .unwrap_or(0);
                    let (at, end) = (u32::try_from(i).map_err(drop)?, u32::try_from(j).map_err(drop)?);
                    out.push(Tok::Param { n, at, end });
                    i = j;
                    continue;
                }
                while b
                    .get(j)
                    .is_some_and(|&x| x.is_ascii_alphanumeric() || x == b'_' || x >= 0x80)
                {
                    j += 1;
                }
                if b.get(j) != Some(&b'$') {
                    out.push(Tok::Punct(b'$'));
                    i += 1;
                    continue;
                }
                let tag = &b[i..=j];
                let body = j + 1;
                let end = find(&b[body..], tag).ok_or(())?;
                i = body + end + tag.len();
                out.push(Tok::Literal);
            }
            b';' => {
                out.push(Tok::Semi(i));
                i += 1;
            }
            b'0'..=b'9' => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_') {
                    i += 1;
                }
                out.push(Tok::Literal);
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                let start = i;
                while b.get(i).is_some_and(|&c| IDENT[c as usize]) {
                    i += 1;
                }
                let word = Kw(&b[start..i]);
                // E'...' (backslash escapes), B'...', X'...', N'...', U&'...' are strings, not words.
                if b.get(i) == Some(&b'\'') && word.0.len() == 1 {
                    let escapes = word.eq_ignore_ascii_case("e");
                    i = skip_string(b, i + 1, escapes)?;
                    out.push(Tok::Literal);
                } else if word.eq_ignore_ascii_case("u")
                    && b.get(i) == Some(&b'&')
                    && b.get(i + 1) == Some(&b'\'')
                {
                    i = skip_string(b, i + 2, false)?;
                    out.push(Tok::Literal);
                } else {
                    out.push(Tok::Word(word));
                }
            }
            _ => {
                out.push(Tok::Punct(c));
                i += 1;
            }
        }
    }
    Ok(())
}

/// Skips a single-quoted string body starting at `i`; returns the index after the closing quote.
fn skip_string(b: &[u8], mut i: usize, backslash_escapes: bool) -> Result<usize, ()> {
    loop {
        match b.get(i) {
            None => return Err(()),
            Some(b'\\') if backslash_escapes => i += 2,
            Some(b'\'') if b.get(i + 1) == Some(&b'\'') => i += 2,
            Some(b'\'') => return Ok(i + 1),
            Some(_) => i += 1,
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `sql` with each parameter `$n` replaced by `values[n - 1]` written as a literal (`NULL` for
/// `None`): the text a simple Query runs to the same effect. `None` when `sql` does not lex or
/// names a parameter it was not given.
pub fn inline_params(sql: &str, values: &[Option<&str>]) -> Option<String> {
    let mut tokens = Tokens::new();
    lex(sql.as_bytes(), &mut tokens).ok()?;
    let mut out = String::with_capacity(sql.len() + 16);
    let mut from = 0;
    for t in &tokens {
        if let Tok::Param { n, at, end } = *t {
            let (n, at, end) = (n as usize, at as usize, end as usize);
            let value = values.get(n.checked_sub(1)?)?;
            out.push_str(&sql[from..at]);
            match value {
                None => out.push_str("NULL"),
                Some(v) => {
                    // An escape string: correct whatever standard_conforming_strings says.
                    out.push_str("E'");
                    for c in v.chars() {
                        match c {
                            '\\' => out.push_str("\\\\"),
                            '\'' => out.push_str("''"),
                            c => out.push(c),
                        }
                    }
                    out.push('\'');
                }
            }
            from = end;
        }
    }
    out.push_str(&sql[from..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(sql: &str) -> Target {
        Classifier::default().classify(sql).target
    }

    #[track_caller]
    fn reads(sql: &str) {
        assert_eq!(target(sql), Target::Standby, "expected a read: {sql}");
    }

    #[track_caller]
    fn writes(sql: &str) {
        assert_eq!(target(sql), Target::Primary, "expected the primary: {sql}");
    }

    #[test]
    fn plain_reads_go_to_standbys() {
        reads("SELECT abalance FROM pgbench_accounts WHERE aid = 1234;");
        reads("select abalance from pgbench_accounts where aid = $1");
        reads("select count(*), max(x), now() from t where y in (1, 2) and exists (select 1 from u)");
        reads("SELECT x::numeric(10,2), cast(y as varchar(20)) FROM t");
        reads("values (1), (2)");
        reads("table t");
        reads("show server_version");
        reads("with recursive r(n) as (select 1 union all select n + 1 from r where n < 3) select * from r");
        reads("select 'insert into x' as s, \"update\" from t -- delete\n");
        reads("select $$ delete from t $$, $tag$ drop table $tag$");
        reads("select e'it\\'s update', u&'\\0041'");
        reads("/* update /* nested */ delete */ select 1");
        reads("(select 1) union (select 2)");
        reads("select pg_catalog.count(*) from t");
        reads("explain select * from t");
        reads("copy t to stdout");
        reads("copy (select * from t) to stdout");
        reads("select inet_server_port(), pg_is_in_recovery(), current_setting('cluster_name')");
        reads("select a from t; select b from u;");
        reads("with x (a, b) as materialized (select 1, 2) select * from x");
        reads("select * from generate_series(1, 3) as g(n)");
        reads("explain (analyze, buffers) select 1");
    }

    /// `flag` of the classification is set for every one of `yes` and for none of `no`.
    #[track_caller]
    fn flag_marks(flag: fn(&Classified) -> bool, yes: &[&str], no: &[&str]) {
        let c = Classifier::default();
        for sql in yes {
            assert!(flag(&c.classify(sql)), "expected it set: {sql}");
        }
        for sql in no {
            assert!(!flag(&c.classify(sql)), "expected it clear: {sql}");
        }
    }

    #[test]
    fn lone_statements_and_copy_from_stdin_are_marked() {
        flag_marks(
            |c| c.single,
            &[
                "select 1",
                "insert into t values (';')",
                "commit;",
                "  update t set x = 1 ; ",
            ],
            &[
                "select 1; commit",
                "insert into t values (1); select 1",
                "",
                ";",
                "select 'unterminated",
            ],
        );
        flag_marks(
            |c| c.copy_in,
            &[
                "copy t from stdin",
                "COPY t (a, b) FROM STDIN WITH (FORMAT csv)",
                "select 1; copy t from stdin",
            ],
            &[
                "copy t to stdout",
                "copy (select 1) to stdout",
                "insert into t values (1)",
                "select 1",
            ],
        );
    }

    #[test]
    fn writes_and_locks_go_to_the_primary() {
        writes("insert into t values (1)");
        writes("UPDATE t SET x = 1");
        writes("delete from t");
        writes("merge into t using u on true when matched then do nothing");
        writes("create table t (x int)");
        writes("drop table t");
        writes("truncate t");
        writes("vacuum t");
        writes("select * from t for update");
        writes("select * from t for no key update");
        writes("select * from t FOR SHARE");
        writes("select * from t for key share");
        writes("with x as (insert into t values (1) returning *) select * from x");
        writes("with x as (delete from t returning *) select count(*) from x");
        writes("select * into t2 from t");
        writes("explain analyze insert into t values (1)");
        writes("explain (analyze) update t set x = 1");
        writes("with x (a) as (select 1) select f(a) as y from x");
        writes("copy t from stdin");
        writes("copy (select 1) from stdin");
        writes("notify ch, 'x'");
        writes("select 1; insert into t values (1)");
        writes("call p()");
        writes("do $$ begin perform 1; end $$");
        writes("lock table t");
        writes("");
        writes("   ;  ");
    }

    #[test]
    fn functions_not_known_to_read_go_to_the_primary() {
        for sql in [
            "select nextval('s')",
            "select setval('s', 1)",
            "select set_config('a.b', 'c', false)",
            "select pg_advisory_lock(1)",
            "select pg_try_advisory_xact_lock(1)",
            "select txid_current()",
            "select my_function(1)",
            "select public.my_function(1)",
            "select \"MyFunc\"(1)",
            "select pg_current_wal_lsn()",
            "select x from t where f(x) > 0",
        ] {
            writes(sql);
        }
        let allow = Classifier::new(&["my_function".into(), "public.other".into()]);
        assert_eq!(allow.classify("select my_function(1)").target, Target::Standby);
        assert_eq!(allow.classify("select public.other(1)").target, Target::Standby);
        assert_eq!(allow.classify("select other(1)").target, Target::Primary);
        assert_eq!(
            allow.classify("select evil.my_function(1)").target,
            Target::Primary
        );
    }

    #[test]
    fn unparseable_input_goes_to_the_primary() {
        writes("select 'unterminated");
        writes("select \"unterminated");
        writes("select /* unterminated");
        writes("select $x$ unterminated");
        writes("select e'\\'");
    }

    #[test]
    fn transactions_are_recognised() {
        let c = Classifier::default();
        let begin = |read_only, isolation| TxCommand::Begin { read_only, isolation };
        assert_eq!(c.classify("BEGIN").tx, begin(false, Isolation::Default));
        assert_eq!(
            c.classify("begin transaction read only").tx,
            begin(true, Isolation::Default)
        );
        assert_eq!(
            c.classify("start transaction isolation level serializable, read only")
                .tx,
            begin(true, Isolation::Serializable)
        );
        assert_eq!(
            c.classify("begin read write").tx,
            begin(false, Isolation::Default)
        );
        assert_eq!(
            c.classify("BEGIN ISOLATION LEVEL REPEATABLE READ").tx,
            begin(false, Isolation::RepeatableRead)
        );
        assert_eq!(
            c.classify("begin work isolation level read committed read write")
                .tx,
            begin(false, Isolation::ReadCommitted)
        );
        assert_eq!(
            c.classify("start transaction isolation level read uncommitted")
                .tx,
            begin(false, Isolation::ReadUncommitted)
        );
        assert_eq!(
            c.classify("begin isolation level bogus").tx,
            begin(false, Isolation::Serializable),
            "an unknown level is taken as the strictest"
        );
        let set = |isolation, snapshot| TxCommand::SetTransaction { isolation, snapshot };
        assert_eq!(
            c.classify("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE").tx,
            set(Isolation::Serializable, false)
        );
        assert_eq!(
            c.classify("set transaction read write").tx,
            set(Isolation::Default, false)
        );
        assert_eq!(
            c.classify("set transaction snapshot '00000003-0000001B-1'").tx,
            set(Isolation::Default, true)
        );
        assert_eq!(c.classify("set transaction read only").target, Target::Primary);
        let chars = c.classify("set session characteristics as transaction isolation level serializable");
        assert_eq!((chars.tx, chars.session_set), (TxCommand::None, true));
        for end in ["commit", "END", "rollback", "abort", "prepare transaction 'x'"] {
            assert_eq!(c.classify(end).tx, TxCommand::End, "{end}");
        }
        for not_end in [
            "rollback to savepoint a",
            "rollback work to a",
            "commit prepared 'x'",
            "rollback prepared 'x'",
            "savepoint a",
        ] {
            assert_eq!(c.classify(not_end).tx, TxCommand::None, "{not_end}");
        }
        for sp in [
            "rollback work to a",
            "savepoint a",
            "release a",
            "RELEASE SAVEPOINT a",
        ] {
            assert!(c.classify(sp).savepoint, "{sp}");
        }
        assert!(!c.classify("rollback prepared 'x'").savepoint);
        assert_eq!(
            c.classify("begin; insert into t values (1); commit").tx,
            TxCommand::End
        );
    }

    #[test]
    fn session_state_is_flagged() {
        let c = Classifier::default();
        let set = c.classify("SET search_path = app");
        assert!(set.session_set && !set.pins_session);
        assert!(!c.classify("set local statement_timeout = 1").session_set);
        assert!(!c.classify("set transaction read only").session_set);
        assert!(c.classify("reset all").session_set);
        assert!(c.classify("discard all").session_set);
        assert!(
            c.classify("select set_config('search_path', 'x', false)")
                .session_set
        );
        for pin in [
            "create temp table t (x int)",
            "create temporary table t (x int)",
            "CREATE LOCAL TEMP TABLE t (x int)",
            "listen ch",
            "select pg_advisory_lock(1)",
            "select pg_try_advisory_lock(1)",
            "declare c cursor with hold for select 1",
            "select * into temp t2 from t",
            "prepare q as select 1",
        ] {
            let r = c.classify(pin);
            assert!(r.pins_session, "{pin}");
            assert_eq!(r.target, Target::Primary, "{pin}");
        }
        assert!(!c.classify("select pg_advisory_xact_lock(1)").pins_session);
        assert!(!c.classify("select pg_advisory_unlock(1)").pins_session);
    }

    #[test]
    fn a_parenthesis_then_no_query_goes_to_the_primary() {
        // Found by the `classify` fuzz target: it went to a standby.
        let c = Classifier::default();
        let found = "               (           group    WITH updat)   group         ph    group        \
                     groudat   group           CREATE t  WITH updat   group               ";
        assert_eq!(c.classify(found).target, Target::Primary);
        assert_eq!(c.classify("(group) create table t()").target, Target::Primary);
        assert_eq!(
            c.classify("((SELECT 1)) UNION (SELECT 2)").target,
            Target::Standby
        );
    }

    #[test]
    fn statements_are_split_with_their_steps() {
        let c = Classifier::default();
        let set = |s: &str| Step::Set(s.to_string());
        assert_eq!(
            c.steps("BEGIN; SET work_mem = '1MB'; rollback").unwrap(),
            vec![
                Step::Begin,
                set("SET work_mem = '1MB'"),
                Step::Rollback { chain: false }
            ]
        );
        assert_eq!(
            c.steps("set local a = 1; reset b ;select set_config('c', ';', false) -- ;\n")
                .unwrap(),
            vec![
                Step::Other,
                set("reset b"),
                set("select set_config('c', ';', false) -- ;"),
            ]
        );
        assert_eq!(
            c.steps("savepoint A; release savepoint a; rollback work to \"A\"; rollback to savepoint b")
                .unwrap(),
            vec![
                Step::Savepoint("a".into()),
                Step::Release("a".into()),
                Step::RollbackTo("A".into()),
                Step::RollbackTo("b".into()),
            ]
        );
        assert_eq!(
            c.steps(
                "commit and chain; end; abort and no chain; prepare transaction 'x'; commit prepared 'x'"
            )
            .unwrap(),
            vec![
                Step::Commit { chain: true },
                Step::Commit { chain: false },
                Step::Rollback { chain: false },
                Step::Commit { chain: false },
                Step::Other,
            ]
        );
        assert_eq!(c.steps(" ; -- nothing\n;").unwrap(), vec![]);
        assert_eq!(c.steps("select 1").unwrap(), vec![Step::Other]);
        assert_eq!(c.steps("set x = 1;").unwrap(), vec![set("set x = 1")]);
        let many = "select 1;".repeat(MAX_STEPS);
        assert_eq!(c.steps(&many).map(|s| s.len()), Some(MAX_STEPS));
        assert_eq!(c.steps(&format!("{many} select 2")), None);
        for unsure in [
            "set a = 'unterminated",
            "create rule r as on insert to t do also (insert into u values (1); insert into u values (2))",
            "create function f() returns int begin atomic select 1; select 2; end",
        ] {
            assert_eq!(c.steps(unsure), None, "{unsure}");
        }
    }

    #[test]
    fn parameters_are_written_in_as_literals() {
        let v = |s| Some(s);
        assert_eq!(
            inline_params("select set_config('a.b', $1, $2::bool)", &[v("x"), v("false")]).as_deref(),
            Some("select set_config('a.b', E'x', E'false'::bool)")
        );
        assert_eq!(
            inline_params("select set_config($1, $1, false)", &[v("it's \\ a")]).as_deref(),
            Some("select set_config(E'it''s \\\\ a', E'it''s \\\\ a', false)")
        );
        assert_eq!(
            inline_params("select set_config('a.b', $1, false)", &[None]).as_deref(),
            Some("select set_config('a.b', NULL, false)")
        );
        // Inside strings, quoted names, comments and dollar quotes `$1` is text.
        let sql = "select '$1', \"$1\", $q$ $1 $q$ /* $1 */, $1 -- $1";
        assert_eq!(
            inline_params(sql, &[v("v")]).as_deref(),
            Some("select '$1', \"$1\", $q$ $1 $q$ /* $1 */, E'v' -- $1")
        );
        assert_eq!(inline_params("select $2", &[v("a")]), None, "no second value");
        assert_eq!(inline_params("select $0", &[v("a")]), None);
        assert_eq!(inline_params("select $99999999999999999999999", &[v("a")]), None);
        assert_eq!(inline_params("select 'open", &[v("a")]), None);
    }

    #[test]
    fn reads_of_unlogged_relations_go_to_the_primary() {
        let c = Classifier::default();
        let unlogged = Relations::new([b"scratch".to_vec(), b"Mixed".to_vec()]);
        let target = |sql: &str| {
            c.classify_with(sql.as_bytes(), Encoding::AsciiSafe, &unlogged)
                .target
        };
        for sql in [
            "select * from scratch",
            "select * from public.SCRATCH where id = 1",
            "select count(*) from t join scratch s on s.id = t.id",
            "select * from \"Mixed\"",
            "table scratch",
        ] {
            assert_eq!(target(sql), Target::Primary, "{sql}");
        }
        for sql in [
            "select * from t",
            "select * from mixed",
            "select * from \"SCRATCH\"",
            "select * from scratch_log",
        ] {
            assert_eq!(target(sql), Target::Standby, "{sql}");
        }
        assert_eq!(
            c.classify_bytes(b"select * from scratch", Encoding::AsciiSafe)
                .target,
            Target::Standby
        );
        assert_eq!(unlogged.len(), 2);
    }

    #[test]
    fn node_local_state_goes_to_the_primary() {
        for sql in [
            "select count(*) from pg_prepared_xacts",
            "SELECT gid FROM pg_catalog.pg_prepared_xacts WHERE gid = 'x'",
            "select pid from pg_stat_activity where pid = 1",
            "select * from PG_LOCKS",
            "select name, prepare_time from pg_prepared_statements order by prepare_time",
            "select * from pg_cursors",
            "select n_tup_ins from pg_stat_user_tables where relname = 't'",
            "select heap_blks_hit from pg_statio_user_tables",
            "select * from pg_stat_progress_vacuum",
            "select * from pg_catalog.\"pg_locks\"",
            "select setting from pg_settings where name = 'transaction_read_only'",
            "select last_value from pg_sequences",
            "select * from pg_replication_slots",
            "table pg_stat_database",
            "with a as (select pid from pg_stat_activity) select count(*) from a",
            "copy (select * from pg_locks) to stdout",
            "select pg_backend_pid()",
            "select pg_current_wal_lsn()",
            "select pg_current_wal_insert_lsn(), pg_current_wal_flush_lsn()",
            "select txid_current_if_assigned()",
            "select pg_current_xact_id()",
            "select txid_current_snapshot()",
            "select pg_stat_get_backend_pid(1)",
            "select current_setting('transaction_read_only')",
            "select current_setting('TRANSACTION_READ_ONLY', true)",
            "select current_setting('in_hot_standby')::bool",
            "select current_setting('default_transaction_read_only')",
            "select current_setting($1)",
            "select current_setting('work' || '_mem')",
            "select current_setting(e'transaction_read_only')",
            "SHOW transaction_read_only",
            "show \"transaction_read_only\"",
            "show in_hot_standby",
            "show default_transaction_read_only",
            "show all",
            "explain select * from pg_stat_activity",
        ] {
            writes(sql);
        }
        // Replicated catalogs and role-independent settings stay balanced.
        for sql in [
            "select * from pg_stats where tablename = 't'",
            "select count(*) from pg_statistic",
            "select * from pg_class where relname = 'pg_stat_activity'",
            "select current_setting('work_mem'), current_setting('app.tenant', true)",
            "select current_setting('work_mem')::int",
            "show work_mem",
            "show transaction isolation level",
            "select pg_is_in_recovery(), inet_server_port()",
        ] {
            reads(sql);
        }
    }

    #[test]
    fn bytes_in_ascii_safe_encodings_are_classified() {
        let c = Classifier::default();
        let safe = |sql: &[u8]| c.classify_bytes(sql, Encoding::AsciiSafe).target;
        // LATIN9: 0xA4 is the euro sign, 0xE9 an e with acute; neither is valid UTF-8 here.
        assert_eq!(
            safe(b"select 'caf\xe9 \xa4' from t where n = '\xe9t\xe9'"),
            Target::Standby
        );
        assert_eq!(safe(b"select \"caf\xe9\" from t\xe9"), Target::Standby);
        assert_eq!(
            safe(b"select * from t where x = '\xe9'; delete from t"),
            Target::Primary
        );
        assert_eq!(safe(b"insert into t values ('\xe9')"), Target::Primary);
        assert_eq!(safe(b"select 'unterminated \xe9"), Target::Primary);
        assert_eq!(safe(b"select f\xe9(1)"), Target::Primary);
        assert_eq!(
            c.classify_bytes(b"begin; select '\xe9'", Encoding::AsciiSafe).tx,
            TxCommand::Begin {
                read_only: false,
                isolation: Isolation::Default
            }
        );
        // EUC_JP: every byte of a multi-byte character is >= 0x80.
        assert_eq!(safe(b"select '\xc6\xfc\xcb\xdc' from t"), Target::Standby);
        // The steps of a non-UTF-8 string: statements without SET are followed as usual; a SET
        // whose text is not UTF-8 is not replayed anywhere (the session stays on the primary).
        assert_eq!(
            c.steps_bytes(b"select '\xe9'; savepoint \"\xe9\"", Encoding::AsciiSafe),
            Some(vec![Step::Other, Step::Savepoint("\u{e9}".into())])
        );
        assert_eq!(
            c.steps_bytes(b"set application_name = 'caf\xe9'", Encoding::AsciiSafe),
            None
        );
        assert_eq!(
            c.steps_bytes(b"savepoint \xc3\xa9; savepoint \xe9", Encoding::AsciiSafe),
            Some(vec![
                Step::Savepoint("\u{c3}\u{a9}".into()),
                Step::Savepoint("\u{e9}".into())
            ]),
            "different bytes stay different names"
        );
    }

    #[test]
    fn ascii_unsafe_encodings_send_non_ascii_text_to_the_primary() {
        let c = Classifier::default();
        let sjis = Encoding::from_name("SJIS");
        assert_eq!(sjis, Encoding::AsciiUnsafe);
        // In SJIS 0x95 0x5C is one character whose second byte is a backslash: a byte-wise lexer
        // would take `'` after it for an escaped quote and hide the DELETE inside a string.
        let sneaky = b"select e'\x95\x5c'; delete from t; select '";
        assert_eq!(c.classify_bytes(sneaky, sjis).target, Target::Primary);
        assert_eq!(
            c.classify_bytes(b"select '\x95\x5c' from t", sjis).target,
            Target::Primary
        );
        assert_eq!(c.steps_bytes(b"select '\x95\x5c'", sjis), None);
        // ASCII means the same in every encoding PostgreSQL supports.
        assert_eq!(c.classify_bytes(b"select 1 from t", sjis).target, Target::Standby);
        assert_eq!(
            c.steps_bytes(b"set a = 1", sjis),
            Some(vec![Step::Set("set a = 1".into())])
        );
        // BIG5: 0xA5 0x5C.
        let big5 = Encoding::from_name("big5");
        assert_eq!(
            c.classify_bytes(b"select '\xa5\x5c'", big5).target,
            Target::Primary
        );
        for name in [
            "SJIS",
            "Shift_JIS",
            "SHIFT_JIS_2004",
            "win932",
            "BIG5",
            "GBK",
            "cp936",
            "UHC",
            "GB18030",
            "JOHAB",
        ] {
            let expect = if name == "cp936" {
                // Not a PostgreSQL name: an unknown name is never sent by the server.
                Encoding::AsciiSafe
            } else {
                Encoding::AsciiUnsafe
            };
            assert_eq!(Encoding::from_name(name), expect, "{name}");
        }
        for name in [
            "UTF8",
            "utf-8",
            "LATIN9",
            "ISO-8859-15",
            "WIN1252",
            "EUC_JP",
            "SQL_ASCII",
            "KOI8R",
        ] {
            assert_eq!(Encoding::from_name(name), Encoding::AsciiSafe, "{name}");
        }
    }

    #[test]
    fn lexer_never_panics_on_odd_bytes() {
        let c = Classifier::default();
        for sql in [
            "$",
            "$$",
            "$a",
            "\"",
            "'",
            "e'",
            "u&",
            "u&'",
            "/*",
            "--",
            "\u{00e9}t\u{00e9}(1)",
            "1e10",
            "a$b(",
            ")",
        ] {
            let _ = c.classify(sql);
        }
    }
}
