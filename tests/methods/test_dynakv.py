"""The paper's DynaKV in the cache: exact at full rank, every stored byte counted, ragged prefixes for real,
arriving tokens gated and stored, the budget guard, the α search's artifacts, SnapKV composition, options."""

from __future__ import annotations

import json

import pytest
import torch
from dynakv_helpers import one_thread  # noqa: F401 - autouse fixture
from lowrank_helpers import ByteTokenizer, generate, prefill
from transformers import GenerationConfig

from kvbench.methods.dynakv import DynaKV
from kvbench.methods.dynakv.library import dims_for_budget, metadata_fraction
from kvbench.methods.dynakv.prefix import FIRST, PrefixLayer, cut_threshold
from kvbench.methods.dynakv.ragged import prefix_mask, rank_classes
from kvbench.methods.dynakv.spectral import hard_ranks, merge_heads
from kvbench.methods.lowrank.latent_attention import pre_rope
from kvbench.prefill import prepare
from kvbench.spec import SpecError, parse_spec
from kvbench.testing import calibration_file

# Four chunks of 384 bytes (one held out) of generated text; gates trained briefly at a fixed α.
TINY = dict(calibration_tokens=1536, steps=4, lr=0.05, alpha=2.0)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> str:
    return str(calibration_file(tmp_path_factory.mktemp("text"), paragraphs=60))


@pytest.fixture(scope="module")
def calibrated(cache_root, text):
    """A prepared DynaKV per (tiny model, options), shared by the tests of this module."""
    methods: dict[tuple, DynaKV] = {}

    def get(model, **options) -> DynaKV:
        key = (id(model), tuple(sorted(options.items())))
        if key not in methods:
            method = DynaKV(**(TINY | {"data": text} | options))
            prepare(method, model, ByteTokenizer())
            methods[key] = method
        return methods[key]

    return get


def dim(model) -> int:
    config = model.config
    return config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)



def bucket_sizes(layer, kind: str) -> dict[int, int]:
    return {index: t.numel() for index, t in layer.buckets[kind][0].items() if t.dim() == 1}


def expected_sizes(ranks: torch.Tensor) -> dict[int, int]:
    """Coefficients per rank class (``ragged.py``): the ranks of the class's tokens, summed."""
    classes = rank_classes(ranks.long())
    return {index: int(ranks[classes == index].long().sum()) for index in classes.unique().tolist()}

def test_full_ranks_reconstruct_the_uncompressed_model_exactly(model, prompt, calibrated):
    """tau = 0 keeps every coefficient (p > 0 everywhere): x̃ U⁻¹ with RoPE at the true positions is the cache."""
    method = calibrated(model, tau=0.0)
    cache, logits = prefill(model, prompt, method, 1.1)  # full rank plus metadata fits 1.1 of the full bytes
    assert all(isinstance(layer, PrefixLayer) and layer.keys is None for layer in cache.layers)
    assert all(int(layer.ranks[kind].min()) == dim(model) for layer in cache.layers for kind in ("key", "value"))
    with torch.inference_mode():
        reference_logits = model(prompt).logits
        reference = model.generate(prompt, generation_config=GenerationConfig(
            do_sample=False, max_new_tokens=9, pad_token_id=0, eos_token_id=None))
    torch.testing.assert_close(logits, reference_logits, atol=1e-4, rtol=1e-4)
    first = logits[:, -1].argmax(-1, keepdim=True)
    assert generate(model, prompt, cache, first) == reference[0, 96:].tolist()


def expected_bytes(layer: PrefixLayer) -> int:
    coefficients = sum(int(layer.ranks[kind].long().sum()) for kind in ("key", "value")) * 4  # float32
    tokens = layer.positions.shape[1]
    return coefficients + tokens * (4 + 2 * 1)  # int32 position, uint8 K and V ranks


@pytest.mark.parametrize("budget", [0.5, 0.25])
def test_every_stored_byte_is_counted_and_the_budget_holds(model, prompt, calibrated, budget):
    method = calibrated(model)
    cache, logits = prefill(model, prompt, method, budget)
    assert budget - 0.02 <= cache.nbytes() / cache.full_nbytes() <= budget  # the guard cut to the budget
    fields = method.row_fields(model)
    assert fields["dynakv_threshold"] > method.tau and fields["dynakv_alpha"] == 2.0 and not fields["masked"]
    ranks_seen = set()
    for layer in cache.layers:
        assert layer.masks is None  # the guard's transient soft masks are gone
        assert layer.nbytes() == sum(t.numel() * t.element_size() for t in layer.tensors()) == expected_bytes(layer)
        for kind in ("key", "value"):
            ranks = layer.ranks[kind]
            assert ranks.dtype == torch.uint8 and ranks.shape == (1, 96) and int(ranks.min()) >= 1
            assert bucket_sizes(layer, kind) == expected_sizes(ranks[0])  # exactly the kept prefixes
            ranks_seen |= set(ranks[0].tolist())
        assert layer.positions.dtype == torch.int32 and layer.positions[0].tolist() == list(range(96))
    assert len(ranks_seen) > 3  # tokens keep different ranks
    # Arriving tokens are gated and stored compressed, at the prompt's threshold; positions continue.
    generated = generate(model, prompt, cache, logits[:, -1].argmax(-1, keepdim=True))
    assert len(generated) == 9 and cache.held_tokens() == [104] * len(cache.layers)
    for layer in cache.layers:
        assert layer.positions[0].tolist() == list(range(104)) and layer.nbytes() == expected_bytes(layer)
        assert int(layer.ranks["key"][0, 96:].max()) < dim(model)


def test_the_guard_keeps_what_the_gates_keep_at_its_threshold(llama, prompt, calibrated, monkeypatch):
    """The guard cuts each layer's prompt once, at the raised threshold: every token keeps the coefficients whose
    soft mask the gates put above it, recomputed here from the dense states each layer compressed."""
    dense = {}
    compress = PrefixLayer.compress

    def recording(layer, gates, layer_idx, *args, **kwargs):
        dense[layer_idx] = layer.keys.clone(), layer.values.clone()
        compress(layer, gates, layer_idx, *args, **kwargs)

    monkeypatch.setattr(PrefixLayer, "compress", recording)
    method = calibrated(llama)
    cache, _ = prefill(llama, prompt, method, 0.25)
    threshold = method.row_fields(llama)["dynakv_threshold"]
    assert threshold > method.tau and len(dense) == len(cache.layers)
    gates, width = method.active.gates, dim(llama)
    for index, layer in enumerate(cache.layers):
        keys, values = dense[index]
        positions = torch.arange(keys.shape[2])[None]
        states = torch.stack([merge_heads(pre_rope(keys, positions, layer.codec.rotary)), merge_heads(values)])
        coefficients = states @ gates.basis[index, :, None]
        mask = gates.layer_masks(coefficients, index)
        mask[..., 0] = FIRST
        ranks = hard_ranks(mask, threshold)
        for k, kind in enumerate(("key", "value")):
            flat, kept = layer.row_latents(kind, 0)
            assert torch.equal(kept.long(), ranks[k, 0])
            assert torch.equal(flat, coefficients[k, 0][prefix_mask(ranks[k, 0], width)])


@pytest.mark.parametrize("bins", [8, 4096])
def test_the_guards_cut_is_the_kth_smallest_soft_mask(bins):
    """``cut_threshold`` equals ``kthvalue`` of the concatenation, with ties, values on bin edges and the first
    coefficients' ``FIRST`` (never cut) mixed in."""
    generator = torch.Generator().manual_seed(0)
    edges = torch.arange(9) / 8  # on the edges of 8 bins
    masks = [torch.rand(500, generator=generator), edges.repeat(20), torch.full((40,), FIRST),
             torch.cat([torch.rand(300, generator=generator) ** 4, torch.full((50,), 0.25)])]
    everything = torch.cat(masks)
    below_first = int((everything < FIRST).sum())
    for remove in [1, 2, 7, 100, 180, 181, 500, 777, below_first - 1, below_first]:
        expected = float(torch.kthvalue(everything, remove).values)
        assert cut_threshold(masks, remove, bins) == expected, remove


def test_a_prompt_within_budget_keeps_the_papers_threshold(llama, prompt, calibrated):
    method = calibrated(llama)
    cache, _ = prefill(llama, prompt, method, 1.1)  # the briefly trained gates keep nearly everything
    assert method.row_fields(llama)["dynakv_threshold"] == method.tau == 0.1
    assert cache.nbytes() / cache.full_nbytes() <= 1.1


def test_non_adaptive_ablation_gives_every_token_of_a_layer_the_same_rank(llama, prompt, calibrated):
    method = calibrated(llama, adaptive=False)
    cache, _ = prefill(llama, prompt, method, 0.3)
    assert cache.nbytes() / cache.full_nbytes() <= 0.3
    for layer in cache.layers:
        for kind in ("key", "value"):
            assert int(layer.ranks[kind].max()) - int(layer.ranks[kind].min()) <= 1


def test_budget_below_one_coefficient_per_token_is_refused(llama, prompt, calibrated):
    with pytest.raises(ValueError, match="floor"):
        prefill(llama, prompt, calibrated(llama), 0.02)


def test_composition_with_snapkv_keeps_one_selection_then_gates_it(llama, prompt, calibrated, text):
    spec = parse_spec("dynakv+snapkv:window=8,tokens=0.5")
    spec.method.dimension = calibrated(llama)
    prepare(spec.method, llama, ByteTokenizer())
    cache, _ = prefill(llama, prompt, spec.method, 0.2)
    assert cache.nbytes() / cache.full_nbytes() <= 0.2
    fields = spec.method.row_fields(llama)
    assert fields["token_fraction"] == 0.5 and fields["dynakv_target_budget"] == pytest.approx(0.4)
    for layer in cache.layers:
        kept = layer.positions[0].tolist()
        assert len(kept) == 48 and kept == sorted(kept) and kept[-8:] == list(range(88, 96))
        assert layer.nbytes() == expected_bytes(layer)


def test_alpha_search_trains_one_artifact_per_alpha_and_reuses_them(llama, prompt, cache_root, text, monkeypatch):
    method = DynaKV(calibration_tokens=1536, data=text, steps=2, lr=0.05)
    prepare(method, llama, ByteTokenizer())
    cache, _ = prefill(llama, prompt, method, 0.4)
    fields = method.row_fields(llama)
    assert cache.nbytes() / cache.full_nbytes() <= 0.4
    assert fields["dynakv_target_budget"] == 0.4 and fields["dynakv_train_steps"] == 2
    assert fields["dynakv_alpha"] == method.active.alpha
    path = method.active.path
    meta = json.loads((path.parent / "meta.json").read_text())
    assert len(meta["loss_curve"]) == 2 and meta["settings"]["alpha"] == fields["dynakv_alpha"]
    assert len(meta["heldout_ranks"]["0.1"]) == llama.config.num_hidden_layers
    records = list(cache_root.glob("calibration/*-dynakv-alpha-*/meta.json"))
    assert len(records) == 1  # the search's record: its probes and the α chosen
    record = json.loads(records[0].read_text())
    assert record["alpha"] == fields["dynakv_alpha"] and [fields["dynakv_alpha"], method.active.fraction] in [
        [a, pytest.approx(r)] for a, r in record["probes"]]
    assert len(record["probes"]) > 1
    for probe in [*cache_root.glob("calibration/*-dynakv-paper-*"), *cache_root.glob("calibration/*-dynakv-basis-*")]:
        if probe != path.parent:  # a later run needs only the record and the chosen α's gates
            for file in probe.iterdir():
                file.unlink()
    import kvbench.methods.dynakv.training as training

    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("a valid artifact was not reused"))
    monkeypatch.setattr(training, "pca_basis", lambda *a, **k: pytest.fail("the basis is needed only to train"))
    again = DynaKV(calibration_tokens=1536, data=text, steps=2, lr=0.05)
    prepare(again, llama, ByteTokenizer())
    prefill(llama, prompt, again, 0.4)
    timing = ("dynakv_setup_s",)
    assert again.active.path == path and {k: v for k, v in again.row_fields(llama).items() if k not in timing} == {
        k: v for k, v in fields.items() if k not in timing}
    assert fields["dynakv_search_probes"] == len(record["probes"]) and fields["dynakv_train_s"] > 0
    assert all(torch.equal(a, b) for a, b in zip(method.active.gates.parameters(), again.active.gates.parameters(),
                                                  strict=True))


def test_budget_targets_the_dimensions_left_after_the_metadata():
    assert metadata_fraction(192, 4) == pytest.approx(6 / 1536)
    assert metadata_fraction(1024, 2) == pytest.approx(8 / 4096)  # int16 ranks beyond 255 dimensions
    assert dims_for_budget(0.3, 192, 4) == pytest.approx(0.3 - 6 / 1536)


@pytest.mark.parametrize(("text", "message"), [
    ("dynakv:window=8", "window applies to gate=ranker only"),
    ("dynakv:gate=ranker,alpha=2", "alpha applies to gate=paper only"),
    ("dynakv:gate=pca", "gate must be 'paper' or 'ranker'"),
    ("dynakv:tau=1", "0 <= tau < 1"),
])
def test_options_of_the_other_variant_are_refused(text, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(text)
