"""Hugging Face models (built from configs: nothing downloads): checkpoints of converted models
through save_pretrained / from_pretrained and safetensors, and what fp8_autocast reports for GPT-2
(Conv1D = addmm) and Qwen2 (grouped-query attention with a padding mask)."""
import pytest
import torch

import tritonfp8 as tf8

transformers = pytest.importorskip("transformers")  # in requirements-cpu.txt: CI runs these


def _qwen2(seed=0):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                                      max_position_embeddings=64, attn_implementation="sdpa")
    return transformers.Qwen2ForCausalLM(config)


def _gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=1,
                                     bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    return transformers.GPT2LMHeadModel(config)


def _batch(step=0):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 128, (2, 32), generator=g)
    mask = torch.ones(2, 32, dtype=torch.long)
    mask[1, :5] = 0  # left padding: rows of masked keys
    return dict(input_ids=ids, attention_mask=mask, labels=ids)


def test_converted_model_round_trips_save_pretrained_and_safetensors(tmp_path):
    """A converted Qwen2 trained 2 steps: save_pretrained writes the stock keys (safetensors), a
    stock from_pretrained loads them with nothing missing or unexpected, and a converted copy of
    it plus the fp8 state (safetensors) computes the same bits."""
    import safetensors.torch as safetensors_torch

    model = tf8.convert(_qwen2(), "hybrid_delayed")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        model(**_batch(step)).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path / "model")
    safetensors_torch.save_file(tf8.nn.fp8_state_dict(model), str(tmp_path / "fp8.safetensors"))
    assert (tmp_path / "model" / "model.safetensors").exists()

    stock, info = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "model", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert not any(isinstance(m, tf8.nn.Linear) for m in stock.modules())
    for name, value in model.state_dict().items():
        assert torch.equal(stock.state_dict()[name], value), name
    stock.load_state_dict(model.state_dict(), strict=True)  # converted -> stock
    model.load_state_dict(stock.state_dict(), strict=True)  # stock -> converted

    resumed = tf8.convert(transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "model"), "hybrid_delayed")
    tf8.nn.load_fp8_state_dict(resumed, safetensors_torch.load_file(str(tmp_path / "fp8.safetensors")))
    model.eval(), resumed.eval()
    with torch.no_grad():
        a, b = model(**_batch(5)).logits, resumed(**_batch(5)).logits
    assert torch.equal(a, b)


def test_gpt2_conv1d_and_attention_are_reported_and_run_in_fp8():
    """GPT-2's projections are Conv1D (torch.addmm with the weight [in, out]): each appears, in fp8.
    In training mode its attention has dropout (attn_pdrop) and is reported in high precision
    with that reason; in eval mode every product runs in fp8."""
    model = _gpt2()
    ac = tf8.fp8_autocast("hybrid")
    with ac:
        model(**_batch()).loss.backward()
    s = ac.summary()
    addmm = {name for name, r in s.items() if r.op == "addmm"}
    assert addmm == {f"transformer.h.{i}.{p}.weight" for i in range(2)
                     for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert all(s[name].fp8_calls == 1 for name in addmm)
    assert set(s["attention[d=64]"].reasons) == {"attention dropout"}
    model.eval()
    ac = tf8.fp8_autocast("hybrid")
    with ac, torch.no_grad():
        fp8_logits = model(**_batch()).logits
    assert ac.fp8_fraction() == 1.0 and ac.fp8_fraction("flops") == 1.0
    with torch.no_grad():
        logits = model(**_batch()).logits
    assert ((fp8_logits - logits).norm() / logits.norm()) < 0.1


def test_qwen2_grouped_query_attention_with_padding_runs_in_fp8():
    """Qwen2 (2 query heads on 1 key/value head, a padding mask): every product in fp8, and the
    loss within 2% of fp32's."""
    model = _qwen2()
    ac = tf8.fp8_autocast("hybrid")
    with ac:
        loss = model(**_batch()).loss
    s = ac.summary()
    assert ac.fp8_fraction() == 1.0, ac.report()
    assert s["attention[d=64]"].fp8_calls == 2
    assert abs(loss.item() - model(**_batch()).loss.item()) < 0.02 * loss.item()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_bert_attention_with_a_padding_mask_runs_in_fp8():
    """BERT (bidirectional, a padding mask on the second sequence): both attention calls and every
    projection in fp8; only the 2-class head (out_features=2) stays high, and the report says why."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=128, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=256, max_position_embeddings=64,
                                     attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    model = transformers.BertForSequenceClassification(config)
    batch = _batch()
    batch["labels"] = torch.tensor([0, 1])
    ac = tf8.fp8_autocast("hybrid")
    with ac:
        model(**batch).loss.backward()
    s = ac.summary()
    assert s["attention[d=64]"].fp8_calls == 2 and not s["attention[d=64]"].high_precision_calls
    high = {name: dict(r.reasons) for name, r in s.items() if r.high_precision_calls}
    assert high == {"classifier.weight": {"out_features=2 is not a multiple of 16": 1}}
    assert "classifier.weight" in ac.report()
