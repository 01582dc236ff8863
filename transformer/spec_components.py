"""The vocabulary of the spec tags and the list of the package's components.

Every test carries ``@pytest.mark.spec(component=..., section=..., kind=...)``. The values
those keywords may take are defined here, in ONE place: :data:`COMPONENTS` (with the
kinds of test each must have, and the reason wherever a kind does not apply),
:data:`SECTIONS` (the paper's sections, ``"torch"`` and ``"extra"``) and :data:`KINDS`;
:func:`tag_problems` says what is wrong with one tag.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

KINDS: tuple[str, ...] = ("shape", "masking", "equivalence", "property", "error")

# Section key -> title, in the order the document presents them: the paper's sections
# ("Attention Is All You Need", Vaswani et al. 2017), then our own guarantees ("extra")
# and the torch behaviour we pin down ("torch").
SECTIONS: dict[str, str] = {
    "3.1": "Encoder and decoder stacks",
    "3.2.1": "Scaled dot-product attention",
    "3.2.2": "Multi-head attention",
    "3.2.3": "Applications of attention in our model (masking)",
    "3.3": "Position-wise feed-forward networks",
    "3.4": "Embeddings and softmax",
    "3.5": "Positional encoding",
    "5.3": "Optimizer",
    "5.4": "Regularization",
    "extra": "Beyond the paper: our own guarantees",
    "torch": "Torch behaviour pinned down",
}
PAPER_SECTIONS: tuple[str, ...] = tuple(key for key in SECTIONS if key[0].isdigit())

# Every component needs these kinds unless it documents why one does not apply.
BASE_REQUIRED: tuple[str, ...] = ("shape", "equivalence", "error")


@dataclass(frozen=True)
class Component:
    """One public component of the package and the kinds of test it must have.

    ``also_required`` adds kinds to :data:`BASE_REQUIRED`; ``not_applicable`` maps a kind
    to the reason it does not apply (it is then neither required nor counted missing).
    ``covered_by = (component, section)`` lets the tests of another component in one
    paper section count for this one, for a component that lives inside another module.
    ``tests`` are the test modules (paths from the repository root) that hold its tests:
    every one must be there and hold at least one of them (:func:`missing_modules`), so
    deleting a module is caught even where other modules cover the same kinds.
    """

    name: str
    title: str
    module: str
    also_required: tuple[str, ...] = ()
    not_applicable: Mapping[str, str] = field(default_factory=dict)
    covered_by: tuple[str, str] | None = None
    tests: tuple[str, ...] = ()

    @property
    def required(self) -> tuple[str, ...]:
        """The kinds this component must have at least one test of, in :data:`KINDS` order."""
        wanted = set(BASE_REQUIRED) | set(self.also_required)
        return tuple(k for k in KINDS if k in wanted and k not in self.not_applicable)


_NO_MASK = "takes no mask: it acts on each position separately"

# THE list of components (the `component=` values of the spec tags), in document order.
COMPONENTS: tuple[Component, ...] = (
    Component(
        "attention",
        "Scaled dot-product attention and the kernel registry",
        "transformer/attention.py",
        also_required=("masking", "property"),
        tests=(
            "property_tests/test_attention_properties.py",
            "property_tests/test_hostile_inputs.py",
            "spec_tests/test_attention.py",
            "spec_tests/test_attention_bias.py",
            "spec_tests/test_attention_selection.py",
            "spec_tests/test_compile.py",
            "spec_tests/test_numerical_robustness.py",
        ),
    ),
    Component(
        "conformance",
        "The attention conformance tool for outside kernels",
        "transformer/conformance/__init__.py",
        not_applicable={
            "masking": "runs the masking cases against other kernels; its own cases are "
            "held to torch by running torch's SDPA through it",
        },
        tests=("spec_tests/test_conformance.py",),
    ),
    Component(
        "chunked_kernel",
        "Chunked online-softmax kernel",
        "transformer/kernels/chunked.py",
        tests=("spec_tests/test_chunked_kernel.py",),
    ),
    Component(
        "triton_kernel",
        "Triton flash-attention kernel",
        "transformer/kernels/triton_flash.py",
        tests=("spec_tests/test_triton_kernel.py",),
    ),
    Component(
        "triton_offline",
        "The Triton kernel compiled for GPU targets, offline",
        "transformer/kernels/triton_offline.py",
        also_required=("masking", "property"),
        tests=("spec_tests/test_triton_offline.py",),
    ),
    Component(
        "multi_head_attention",
        "Multi-head attention",
        "transformer/multi_head_attention.py",
        tests=(
            "property_tests/test_hostile_inputs.py",
            "spec_tests/test_compile.py",
            "spec_tests/test_multi_head_attention.py",
            "spec_tests/test_numerical_robustness.py",
            "spec_tests/test_transforms.py",
        ),
    ),
    Component(
        "feed_forward",
        "Position-wise feed-forward network",
        "transformer/feed_forward.py",
        not_applicable={"masking": f"{_NO_MASK} (§3.3)"},
        tests=("property_tests/test_hostile_inputs.py", "spec_tests/test_feed_forward.py"),
    ),
    Component(
        "positional",
        "Sinusoidal positional encoding",
        "transformer/positional.py",
        not_applicable={"masking": f"{_NO_MASK}, adding a fixed table (§3.5)"},
        tests=("property_tests/test_hostile_inputs.py", "spec_tests/test_positional.py"),
    ),
    Component(
        "embeddings",
        "Embeddings, sqrt(d_model) scaling and the tied pre-softmax projection",
        "transformer/model.py",
        covered_by=("model", "3.4"),
        tests=("spec_tests/test_model.py",),
    ),
    Component(
        "layers",
        "Encoder/decoder layers and stacks, nn.Transformer",
        "transformer/layers.py",
        also_required=("masking", "property"),
        tests=(
            "property_tests/test_hostile_inputs.py",
            "property_tests/test_layers_properties.py",
            "spec_tests/test_layers.py",
            "spec_tests/test_numerical_robustness.py",
            "spec_tests/test_transforms.py",
        ),
    ),
    Component(
        "model",
        "Seq2SeqTransformer and ModelConfig",
        "transformer/model.py",
        tests=(
            "property_tests/test_hostile_inputs.py",
            "spec_tests/test_compile.py",
            "spec_tests/test_model.py",
            "spec_tests/test_numerical_robustness.py",
        ),
    ),
    Component(
        "generation",
        "Greedy decoding and beam search",
        "transformer/generate.py",
        tests=(
            "property_tests/test_generation_properties.py",
            "property_tests/test_hostile_inputs.py",
            "spec_tests/test_generation.py",
        ),
    ),
    Component(
        "kv_cache",
        "The KV cache: incremental decoding through the modules themselves",
        "transformer/kv_cache.py",
        tests=("spec_tests/test_kv_cache.py", "spec_tests/test_matvec.py"),
    ),
    Component(
        "checkpoint",
        "Checkpoints",
        "transformer/checkpoint.py",
        not_applicable={"masking": "stores and restores tensors; computes no attention"},
        tests=(
            "property_tests/test_hostile_inputs.py",
            "spec_tests/test_checkpoint.py",
            "spec_tests/test_goals.py",
        ),
    ),
    Component(
        "data",
        "Tasks, tokenizer and batching",
        "transformer/data.py",
        tests=(
            "property_tests/test_data_properties.py",
            "spec_tests/test_data.py",
            "spec_tests/test_tokenizer.py",
        ),
    ),
    Component(
        "training",
        "Training recipe: Adam, schedule, label smoothing",
        "transformer/training.py",
        tests=("spec_tests/test_goals.py", "spec_tests/test_training.py"),
    ),
    Component(
        "cli",
        "The `transformer` command",
        "transformer/cli.py",
        not_applicable={"masking": "parses arguments and calls the library, which masks"},
        tests=("spec_tests/test_cli.py", "spec_tests/test_goals.py"),
    ),
    Component(
        "bench",
        "Benchmarks",
        "transformer/bench.py",
        not_applicable={
            "equivalence": "measures time and memory only; the kernels it times are held "
            "to their references by the attention suites",
            "masking": "times the kernels; their masking is pinned by the attention suites",
        },
        tests=("spec_tests/test_bench.py",),
    ),
    Component(
        "specification",
        "This document and its coverage matrix",
        "transformer/specification.py",
        not_applicable={"masking": "renders test records; computes no attention"},
        tests=("spec_tests/test_specification.py",),
    ),
)
COMPONENT_BY_NAME: dict[str, Component] = {c.name: c for c in COMPONENTS}


def tag_problems(component: object, section: object, kind: object) -> list[str]:
    """What is wrong with one spec tag (empty when it is valid), naming each bad value."""
    problems = []
    for name, value, allowed in (
        ("component", component, tuple(COMPONENT_BY_NAME)),
        ("section", section, tuple(SECTIONS)),
        ("kind", kind, KINDS),
    ):
        if value is None:
            problems.append(f"no {name}")
        elif value not in allowed:
            problems.append(f"{name} {value!r} is not one of {', '.join(allowed)}")
    return problems
