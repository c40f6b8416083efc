"""Tiny tokenizers trained locally (in well under a second) for test fixtures.

Nothing is downloaded: both trainers run on CORPUS below. Outputs are deterministic, byte for
byte, so fixtures built from them are too.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

CORPUS = """\
The morning train left the station a little after seven, and most of the people on board were \
still holding paper cups of coffee. A woman near the window was reading a book about the history \
of bridges, while the man beside her tried to finish a crossword puzzle before his stop.
When the weather turns cold, the small lake behind the school freezes from the edges inward. \
Children test the ice with long sticks, and their parents call them back to the shore again and \
again. By the middle of winter the whole surface is white and quiet.
My grandmother kept a garden with tomatoes, beans, onions and a row of tall sunflowers. She \
said that a garden teaches patience, because nothing you plant today will be ready tomorrow. \
Every evening she walked between the rows and pulled a few weeds by hand.
The library opens at nine on weekdays and at ten on Saturday. It is closed on Sunday and on \
public holidays. Visitors may borrow up to twelve books at a time, and they can keep them for \
three weeks before they have to bring them back or renew them.
In the old part of the city the streets are narrow and the houses lean toward each other, as if \
they were sharing a secret. Tourists take pictures of the painted doors, the iron balconies and \
the cats that sleep on warm stone steps in the afternoon sun.
Learning to play the piano takes time. At first your fingers feel slow and clumsy, and the \
simplest song seems impossible. Then one day you notice that your hands know where to go, and \
the music starts to sound like something you would want to hear.
The engineer checked the numbers twice before she signed the report. The bridge had to carry \
heavy trucks for at least fifty years, so every beam and every bolt mattered. Her team spent the \
whole week testing the steel in the lab.
On the farm the day begins before sunrise. The cows are milked, the chickens are fed, and the \
dog runs circles around the barn as if it were the most important job in the world. Later, the \
farmer drives into town to sell eggs and fresh bread at the market.
Some people like to plan every detail of a trip, with lists of places to see and times to arrive. \
Others prefer to wander, to follow a street just because it looks interesting, and to eat \
wherever the smell from the kitchen is best. Both kinds of travelers come home with good stories.
The river is wide and slow near the town, but in the mountains it is a fast, cold stream that \
jumps over rocks and falls into deep green pools. Fishermen wait on the banks for hours, and \
sometimes they catch nothing at all, which they say is part of the fun.
When the power went out, the whole street became dark and strangely silent. Neighbors came out \
of their houses with candles and flashlights, and for an hour or two everyone talked to each \
other in a way they had not done in years.
A good cup of tea needs water that is hot but not boiling, leaves that are fresh, and a few \
minutes of waiting. My uncle says that the waiting is the most important part, because it \
gives you time to think about nothing in particular.
The museum has a room full of clocks, some of them hundreds of years old. They all tick at \
slightly different speeds, so the room is never quiet, and at noon the bells ring one after \
another for almost a minute.
He wrote letters to his sister every month, even after she moved to the other side of the \
country. The letters were short, and they were mostly about the weather, the garden and the \
neighbors, but she kept every one of them in a wooden box.
The children built a boat out of old boards, rope and an empty barrel. It floated for about \
ten minutes before it started to sink, and they all swam back to the dock laughing and \
shouting that the next one would be better.
The recipe is simple: 2 cups of flour, 3 eggs, 1 cup of milk and a pinch of salt. Mix it all \
together, let it rest for 20 minutes, and bake it at 180 degrees. Don't open the oven too early!
"Where are you going?" she asked. "To the harbor," he said. "The ferry leaves at 10:45, and I \
can't miss it again." It's a long walk, so he took the shortcut through the park (the one with \
the old fountain) and arrived just in time.
"""



def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n",
                    encoding="utf-8")


def make_sentencepiece(out_dir: Path, vocab_size: int = 320) -> Path:
    """Gemma-style SentencePiece BPE: byte fallback, no dummy prefix, raw whitespace kept.

    Ids: <pad>=0 <eos>=1 <bos>=2 <unk>=3 <mask>=4, then the 256 byte pieces, then characters
    and merges; vocab_size must be at least 303 (specials + bytes + the corpus' characters).
    Writes tokenizer.model and tokenizer_config.json (GemmaTokenizer, add_bos_token true).
    """
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=0.995,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        control_symbols=["<mask>"],
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        allow_whitespace_only_pieces=True,
        num_threads=1,
        minloglevel=2,
    )
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    _write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "add_bos_token": True,
        "add_eos_token": False,
    })
    return out_dir


BPE_STYLES = {
    # style: (special tokens in id order, bos, eos, unk, BOS prepended by the post-processor)
    "gpt2": (("<|endoftext|>",), "<|endoftext|>", "<|endoftext|>", "<|endoftext|>", False),
    "llama": (("<s>", "</s>"), "<s>", "</s>", None, True),
    "chatml": (("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>", None, False),
}

# A ChatML template in the style of Qwen's (written for these fixtures): a default system turn
# unless the conversation starts with one, then <|im_start|>role ... <|im_end|> turns.
CHATML_TEMPLATE = (
    "{%- for message in messages %}\n"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n"
)


def make_bpe(out_dir: Path, vocab_size: int = 400, style: str = "gpt2") -> Path:
    """Byte-level BPE trained with `tokenizers`, laid out like GPT-2-family or Llama-3 checkpoints.

    "gpt2": one special token <|endoftext|> (bos = eos = unk), nothing added on encode (GPT-2,
    Phi-2, Falcon, StableLM). "llama": <s> prepended by a TemplateProcessing post-processor,
    eos </s>. "chatml": Qwen's layout: no BOS, eos <|im_end|>, and a ChatML chat template.
    Writes tokenizer.json and tokenizer_config.json (+ special_tokens_map.json for "llama").
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    if style not in BPE_STYLES:
        raise ValueError(f"unknown BPE style {style!r}; expected one of {sorted(BPE_STYLES)}")
    specials, bos, eos, unk, add_bos = BPE_STYLES[style]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                         show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    missing = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    if missing < 0:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE")
    if missing:  # a small corpus can run out of merges: pad with unused special tokens
        tok.add_special_tokens([AddedToken(f"<|extra_{i}|>", special=True, normalized=False)
                                for i in range(missing)])
    byte_level = processors.ByteLevel(trim_offsets=False)
    if add_bos:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.Sequence([byte_level, processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, bos_id)])])
    else:
        tok.post_processor = byte_level
    (out_dir / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")

    added = {
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                 "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
        for i, t in sorted(tok.get_added_tokens_decoder().items())
    }
    config: dict = {
        "added_tokens_decoder": added,
        "bos_token": bos,
        "eos_token": eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
    }
    if style == "gpt2":
        config.update(tokenizer_class="GPT2Tokenizer", unk_token=unk, add_prefix_space=False)
    elif style == "chatml":
        config.update(tokenizer_class="PreTrainedTokenizerFast", pad_token="<|endoftext|>",
                      chat_template=CHATML_TEMPLATE)
    else:
        config.update(tokenizer_class="PreTrainedTokenizerFast")
        _write_json(out_dir / "special_tokens_map.json", {"bos_token": bos, "eos_token": eos})
    _write_json(out_dir / "tokenizer_config.json", config)
    return out_dir
