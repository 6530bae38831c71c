//! ozeki-sim: an Ozeki NG HTTP API simulator for demos, tests and benchmarks.
