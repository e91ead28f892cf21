#![no_main]
// The property checked is documented on moat::fuzz::url_new.
libfuzzer_sys::fuzz_target!(|data: &[u8]| moat::fuzz::url_new(data));
