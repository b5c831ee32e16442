"""Test fixtures that ship with loraport, kept apart from the library: no module of loraport
outside this package imports it (tests/test_build.py checks). The test suite and the benchmarks
import it; it imports only the library.

- ``loraport.testing.tiny``: tiny base models and LoRAs of every family with the real key
  names, their writers, and the bundled example (examples/make_tiny_example.py).
- ``loraport.testing.llama``: a tiny trainable Llama-named model and its synthetic tasks (the
  transfer-quality test and benchmark).
- ``loraport.testing.spectra``: weight pairs with spectra like released weights and known
  related/unrelated labels, and the suite running the default gate against its float64 oracle
  (tests/test_gate.py; benchmarks/gate.py --suite).
- ``loraport.testing.fuzz``: the property-based fuzzer over every file reader (needs
  hypothesis; tests/test_fuzz.py runs a subset, benchmarks/fuzz.py runs it at scale)."""
