#![no_main]
// The property checked is documented on moat::fuzz::stdlib_codecs.
libfuzzer_sys::fuzz_target!(|data: &[u8]| moat::fuzz::stdlib_codecs(data));
