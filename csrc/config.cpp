// The engine knobs' one parser and the process-wide parsed config (config.h). Each knob is one
// row of kKnobs: its name, its environment variable (none for test-only knobs) and how its value
// sets EngineConfig. Invalid values raise ValueError naming the variable and the choices.
#include "config.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>

namespace loraport {
namespace {

using Setter = void (*)(EngineConfig&, std::string_view value, const char* label);

struct Knob {
  const char* name;
  const char* env;  // nullptr: set only through the test hook
  Setter set;
};

void set_rayleigh_ritz(EngineConfig& c, std::string_view v, const char* label) {
  using R = EngineConfig::RayleighRitz;
  TORCH_CHECK_VALUE(v.empty() || v == "svd" || v == "eigh" || v == "host", label, " must be svd, eigh or host, got ",
                    v);
  c.rayleigh_ritz = v.empty() ? R::Default : v == "svd" ? R::Svd : v == "eigh" ? R::Eigh : R::Host;
}

void set_upcast_chunk_bytes(EngineConfig& c, std::string_view v, const char*) {
  c.upcast_chunk_bytes = v.empty() ? 0 : std::max<int64_t>(1, std::atoll(std::string(v).c_str()));
}

void set_gram_pass(EngineConfig& c, std::string_view v, const char*) { c.gram_pass = v != "0"; }
void set_skinny_kernels(EngineConfig& c, std::string_view v, const char*) { c.skinny_kernels = v != "0"; }
void set_bf16_kernels(EngineConfig& c, std::string_view v, const char*) { c.bf16_kernels = v != "0"; }

void set_cusolver_eigh(EngineConfig& c, std::string_view v, const char* label) {
  using E = EngineConfig::CusolverEigh;
  TORCH_CHECK_VALUE(v.empty() || v == "0" || v == "1" || v == "require", label, " must be 0, 1 or require, got ", v);
  c.cusolver_eigh = v == "0" ? E::Off : v == "require" ? E::Require : E::On;
}

void set_cpu_policy(EngineConfig& c, std::string_view v, const char* label) {
  TORCH_CHECK_VALUE(v.empty() || v == "cpu" || v == "cuda", label, " must be cpu or cuda, got ", v);
  c.cpu_runs_cuda_flow = v == "cuda";
}

constexpr Knob kKnobs[] = {
    {"rayleigh_ritz", "LORAPORT_RAYLEIGH_RITZ", &set_rayleigh_ritz},
    {"upcast_chunk_bytes", "LORAPORT_UPCAST_CHUNK_BYTES", &set_upcast_chunk_bytes},
    {"gram_pass", "LORAPORT_GRAM_PASS", &set_gram_pass},
    {"skinny_kernels", "LORAPORT_SKINNY_KERNELS", &set_skinny_kernels},
    {"bf16_kernels", "LORAPORT_BF16_KERNELS", &set_bf16_kernels},
    {"cusolver_eigh", "LORAPORT_CUSOLVER_EIGH", &set_cusolver_eigh},
    {"cpu_policy", nullptr, &set_cpu_policy},
};

// The parsed config and the raw value of every knob that is set.
struct State {
  std::mutex mutex;
  EngineConfig config;
  std::map<std::string, std::string, std::less<>> raw;
};

// Parsed on first use. An invalid environment value raises here, and again on every later call
// (a static whose initializer throws is initialized again next time), as the op would.
State& state() {
  static State* const parsed = [] {
    auto* s = new State;  // never destroyed: ops may run during static destruction
    for (const Knob& knob : kKnobs) {
      const char* value = knob.env ? std::getenv(knob.env) : nullptr;
      if (!value) continue;
      try {
        knob.set(s->config, value, knob.env);
      } catch (...) {
        delete s;
        throw;
      }
      s->raw[knob.name] = value;
    }
    return s;
  }();
  return *parsed;
}

}  // namespace

EngineConfig engine_config() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  return s.config;
}

std::string set_knob_for_testing(std::string_view name, std::string_view value) {
  const auto knob = std::find_if(std::begin(kKnobs), std::end(kKnobs), [&](const Knob& k) { return name == k.name; });
  TORCH_CHECK_VALUE(knob != std::end(kKnobs), "loraport._testing_set_knob: no knob named \"", name,
                    "\" (docs/engine-knobs.md)");
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  knob->set(s.config, value, knob->env ? knob->env : knob->name);  // raises on an invalid value
  const auto it = s.raw.find(name);
  std::string previous = it == s.raw.end() ? std::string() : it->second;
  if (value.empty()) {
    if (it != s.raw.end()) s.raw.erase(it);
  } else {
    s.raw[std::string(name)] = std::string(value);
  }
  return previous;
}

}  // namespace loraport
