"""Test fixtures that ship with loraport, kept apart from the library: no module of loraport
outside this package imports it (tests/test_build.py checks). ``loraport.testing.tiny`` builds
tiny base models and LoRAs with the real key names of each family, for the test suite, the
benchmarks and the bundled example (examples/make_tiny_example.py)."""
