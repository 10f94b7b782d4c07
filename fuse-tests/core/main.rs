//! The filesystem core driven through its public API, without a mount: each test builds a
//! `SimFs` over an in-memory store (wrapped in the failure-injecting one) exactly as a mount
//! wires it (`world.rs`), then calls it as the FUSE adapter would. The model-based test
//! (`model_tests.rs`) runs random operation sequences against a POSIX model.
//!
//! Real mounts against Azurite are the other test target, `fuse` (`fuse-tests/main.rs`).

mod async_close_tests;
mod concurrency_tests;
mod hydration_tests;
mod in_place_tests;
mod model_tests;
mod read_tests;
mod refresh_tests;
mod snapshot_tests;
mod storm_tests;
mod stream_tests;
mod world;
mod write_tests;
