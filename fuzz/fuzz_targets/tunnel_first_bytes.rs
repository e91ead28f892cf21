#![no_main]
// The property checked is documented on moat::fuzz::tunnel_first_bytes.
libfuzzer_sys::fuzz_target!(|data: &[u8]| moat::fuzz::tunnel_first_bytes(data));
