pub mod h1;
