"""Known limits of inference engines, as data, checked against a conversion plan's summary.

Each row names the engine, when it applies (summary key -> the values that hit it, or a named test) and
what goes wrong. ``upcycle convert`` (dry runs included) prints a warning line for every row a plan hits;
docs/engines.md says where each row comes from.
"""

from __future__ import annotations

from typing import Any, Callable

#: named tests usable in a row's ``when``
TESTS: dict[str, Callable[[Any], bool]] = {
    "not_power_of_two": lambda n: isinstance(n, int) and n > 0 and n & (n - 1) != 0,
}

ENGINE_LIMITS: tuple[dict[str, Any], ...] = (
    {"engine": "llama.cpp",
     "when": {"num_experts": "not_power_of_two"},
     "limit": "expert counts that are not a power of two ({num_experts} here) are reported to fail or run slowly "
              "on some llama.cpp GPU backends (its CPU backend is not affected); prefer 4, 8, 16, ... experts "
              "for a model meant for llama.cpp"},
    {"engine": "llama.cpp",
     "when": {"target": ["flex_olmo"]},
     "limit": "convert_hf_to_gguf.py has no FlexOlmo converter, so this output cannot be turned into a GGUF file"},
    {"engine": "vLLM, SGLang, llama.cpp, MLX",
     "when": {"target": ["upcycle"]},
     "limit": "the bundled model is transformers remote code; these engines load only their own architectures "
              "(use a native --target where one is exact)"},
)


def _hits(value: Any, condition: Any) -> bool:
    if isinstance(condition, str):
        return TESTS[condition](value)
    return value in condition


def engine_warnings(summary: dict[str, Any]) -> list[str]:
    """One line per known engine limit that the plan ``summary`` hits."""
    lines = []
    for row in ENGINE_LIMITS:
        if all(_hits(summary.get(key), condition) for key, condition in row["when"].items()):
            lines.append(f"{row['engine']}: {row['limit'].format(**summary)}")
    return lines
