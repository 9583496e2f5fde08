//! Where a request goes. The relay core sends everything to the primary; this module
//! holds the statement classifier that routing builds on.

pub mod classify;
