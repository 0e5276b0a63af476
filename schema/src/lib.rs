//! The ha-stack database schema: versioned SQL migrations embedded in the binaries.
