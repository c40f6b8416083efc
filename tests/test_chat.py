"""Chat templates: `run --chat` / `generate_response(chat=True)` give transformers' ids."""

from __future__ import annotations

import json

import pytest

from llmtool import LlmInference, LlmInferenceOptions
from llmtool.chat_template import ChatTemplate, PromptAffixes
from llmtool.errors import LlmToolError
from llmtool.formats.llm_params import decode_llm_parameters, encode_llm_parameters
from tests.test_run import llmtool
from tests.tiny_tokenizers import CHATML_TEMPLATE

# Templates in the style of Gemma's (BOS, no system role, "model" turns) and Llama 3's,
# written for these tests.
GEMMA_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
LLAMA3_STYLE = (
    "{{- bos_token }}{% for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
MESSAGES = [
    [{"role": "user", "content": "Where is the library?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "The ferry?"},
        {"role": "assistant", "content": "At 10:45."},
        {"role": "user", "content": "  And then?\n"},
    ],
]


def reference_ids(folder, messages) -> list[int]:
    from transformers import AutoTokenizer

    out = AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True
    )
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def qwen3(tiny_model, converted):
    """(checkpoint folder with a ChatML template, converted float32 container)."""
    return tiny_model("QWEN3"), converted("QWEN3")


def test_cli_chat_gives_apply_chat_template_ids(qwen3):
    folder, model = qwen3
    args = ["run", "--model", str(model), "--prompt", "Where is the library?", "--chat"]
    r = llmtool(*args, "--system", "Be brief.", "--max-tokens", "64", "--top-k", "1", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is the library?"},
    ]
    assert data["prompt_token_ids"] == reference_ids(folder, messages)


def test_python_chat_messages_and_end_of_turn(qwen3):
    folder, model = qwen3
    options = LlmInferenceOptions(model_path=str(model), max_tokens=128, top_k=1, num_threads=1)
    with LlmInference.create_from_options(options) as llm:
        for messages in MESSAGES:
            result = llm.generate(messages)  # a list means chat
            assert result.prompt_token_ids == reference_ids(folder, messages)
        prompt = "Where is the library?"
        chat = llm.generate(prompt, chat=True)
        assert chat.prompt_token_ids == reference_ids(folder, MESSAGES[0])
        assert llm.generate_response(prompt, chat=True) == chat.text
        plain = llm.generate(prompt)
        assert plain.prompt_token_ids == llm.tokenizer.encode(prompt)
        # The template's end-of-turn token stops a chat reply (and only a chat reply).
        im_end = llm.tokenizer.token_to_id("<|im_end|>")
        assert llm.chat_stop_ids() == {im_end}
        llm.tokenizer.stop_ids = []
        first = llm.generate(prompt, chat=True).token_ids[0]
        llm.chat_stop_ids = lambda: {first}  # type: ignore[method-assign]
        stopped = llm.generate(prompt, chat=True)
        assert stopped.stop_reason == "stop_token" and stopped.token_ids == []
        assert llm.generate(prompt).stop_reason != "stop_token"  # plain text: no chat stops
        with pytest.raises(LlmToolError, match="system prompt needs chat"):
            llm.generate(prompt, system="x")


def test_model_without_a_template_says_so(converted):
    options = LlmInferenceOptions(model_path=str(converted("LLAMA")), max_tokens=64)
    with LlmInference.create_from_options(options) as llm:
        with pytest.raises(LlmToolError, match="no chat template"):
            llm.generate("hello", chat=True)


def test_prompt_affixes_for_bundles():
    chatml = ChatTemplate(CHATML_TEMPLATE, {"eos_token": "<|im_end|>"})
    assert chatml.prompt_affixes() == PromptAffixes(
        "<|im_start|>user\n",
        "<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
    )
    assert chatml.prompt_affixes("Be brief.").session_prefix == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
    )
    assert chatml.end_of_turn() == "<|im_end|>"
    record = {"start_token": "<|im_start|>", **chatml.prompt_affixes().llm_parameters()}
    assert decode_llm_parameters(encode_llm_parameters(record)) == record

    gemma = ChatTemplate(GEMMA_STYLE, {"bos_token": "<bos>", "eos_token": "<eos>"})
    assert gemma.prompt_affixes() == PromptAffixes(
        "<start_of_turn>user\n", "<end_of_turn>\n<start_of_turn>model\n", ""
    )
    assert gemma.end_of_turn() == "<end_of_turn>"
    assert gemma.role_affixes() == {  # no system turn of its own
        "user": ("<start_of_turn>user\n", "<end_of_turn>\n"),
        "model": ("<start_of_turn>model\n", "<end_of_turn>\n"),
    }
    with pytest.raises(LlmToolError, match="System role not supported"):
        gemma.prompt_affixes("Be brief.")

    llama3 = ChatTemplate(LLAMA3_STYLE, {"bos_token": "<|begin_of_text|>"})
    affixes = llama3.prompt_affixes("Be brief.")
    assert affixes == PromptAffixes(
        "<|start_header_id|>user<|end_header_id|>\n\n",
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>",
    )
    # The affixes rebuild the template's own rendering (after the BOS the runtime adds).
    text = llama3.render(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert text == "<|begin_of_text|>" + affixes.session_prefix + affixes.prompt_prefix + (
        "Hi" + affixes.prompt_suffix
    )


def test_bad_templates_and_messages():
    with pytest.raises(LlmToolError, match="invalid chat template"):
        ChatTemplate("{% for %}")
    with pytest.raises(LlmToolError, match="role"):
        from llmtool.chat_template import chat_messages

        chat_messages([{"role": "robot", "content": "x"}])


def test_bundle_records_the_chat_template(qwen3, tmp_path):
    """`bundle` writes the template as the .task's session prefix + prompt prefix/suffix and
    as the .litertlm's user/model turn affixes, and adds its end-of-turn token to the stop
    tokens; llmtool and LiteRT-LM then frame a prompt as the template does."""
    from llmtool.config import BundleConfig
    from llmtool.formats.task_bundle import read_task_bundle
    from llmtool.pipelines.bundle import bundle

    folder, model = qwen3
    task = tmp_path / "chat.task"
    summary = bundle(BundleConfig(model=str(model), output_filename=str(task)))
    template = ChatTemplate(CHATML_TEMPLATE)
    affixes = template.prompt_affixes()
    params = decode_llm_parameters(read_task_bundle(task, ("METADATA",))["METADATA"])
    assert params["prompt_template"] == affixes.llm_parameters()["prompt_template"]
    assert "<|im_end|>" in params["stop_tokens"] and "<|im_end|>" in summary["stop_tokens"]
    assert template.role_affixes() == {
        "user": ("<|im_start|>user\n", "<|im_end|>\n"),
        "model": ("<|im_start|>assistant\n", "<|im_end|>\n"),
        "system": ("<|im_start|>system\n", "<|im_end|>\n"),
    }
    litertlm = tmp_path / "chat.litertlm"
    bundle(BundleConfig(model=str(model), output_filename=str(litertlm)))
    prompt = "Where is the library?"
    framed = affixes.prompt_prefix + prompt + affixes.prompt_suffix  # no default system turn
    options = LlmInferenceOptions(model_path=str(litertlm), max_tokens=96, num_threads=1)
    with LlmInference.create_from_options(options) as llm:
        ids, _ = llm.prompt_ids(prompt)
        assert ids == llm.tokenizer.encode(framed, add_bos=False)
    litert_lm = pytest.importorskip("litert_lm")
    engine = litert_lm.Engine(
        str(litertlm), backend=litert_lm.Backend.CPU(thread_count=1), cache_dir=":nocache"
    )
    conversation = engine.create_conversation()
    assert conversation.render_message_to_string({"role": "user", "content": prompt}) == framed


def test_a_broken_template_is_refused_when_read(tmp_path):
    from llmtool.tokenizer import read_tokenizer_files
    from tests.tiny_tokenizers import make_bpe

    make_bpe(tmp_path, 320, "chatml")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% if messages %}never closed"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(LlmToolError, match="invalid chat template") as err:
        read_tokenizer_files(tmp_path)
    assert str(err.value).startswith(str(tmp_path / "tokenizer_config.json"))
