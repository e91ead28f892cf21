//! moat's integration tests: one binary (2-core machines), real processes and sockets.

mod harness;

mod auth;
mod authoring;
mod bindings;
mod blob_stores;
mod blobs;
mod cli;
mod cluster;
mod container_example;
mod container_limits;
mod containers;
mod decision;
mod docs_blocks;
mod egress;
mod exhaustion;
mod faults;
mod hardening;
mod intercept;
mod layering;
mod limits;
mod lua_api;
mod memory;
mod parsing;
mod policytest;
mod recipes;
mod reload;
mod runtime_policy;
mod sandbox;
mod sandbox_modes;
mod stores;
mod tunnel;
mod websocket;
