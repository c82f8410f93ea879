//! Entry points into parsers that are private to their modules, for the fuzz targets in `fuzz/`
//! (feature `fuzzing`, off in every build that ships). Each takes plain bytes and returns plain
//! data, so that a target can compare what different deliveries of the same bytes give.

pub use crate::transport::fuzzing::{connect_answer, websocket_frames, yamux_headers};
