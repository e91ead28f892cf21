#![no_main]
// The property checked is documented on moat::fuzz::host_pattern.
libfuzzer_sys::fuzz_target!(|data: &[u8]| moat::fuzz::host_pattern(data));
