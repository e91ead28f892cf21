#![no_main]
// The property checked is documented on moat::fuzz::config_toml.
libfuzzer_sys::fuzz_target!(|data: &[u8]| moat::fuzz::config_toml(data));
