"""CTranslate2 as a benchmark engine (optional: pip install ctranslate2).

The same random texar weights as the other engines are written as a Hugging
Face GPT-2 directory (utils/hf_dir.write_hf_dir, no transformers save) and
converted once with CTranslate2's own TransformersConverter; float32 and int8
load that one converted model with different compute types (CTranslate2
quantizes to int8 as it loads).

Also `python benchmarks/ct2_engine.py --stream MODEL_DIR MAX_LENGTH`: a small
interactive generator on CTranslate2 that reads one prompt line, streams its
greedy continuation the way gpt2_generate_main.py does (our tokenizer, whole
characters printed as they settle), the CTranslate2 side of the CLI timing
(COMPUTE_TYPE, float32 by default, int8 for CTranslate2's int8).

Nothing here imports torch: with torch loaded in the same process (its
OpenMP runtime beside CTranslate2's), CTranslate2 float32 ran 10-20x slower
on the 2-core dev machine, so its benchmark processes stay torch-free.
"""
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

COMPUTE_TYPES = {"ct2": "float32", "ct2_int8": "int8"}


def available() -> bool:
    try:
        import ctranslate2  # noqa: F401
        import transformers  # noqa: F401  (its converter loads the HF model)
    except ImportError:
        return False
    return True


def write_model_dirs(model, root: str):
    """(Hugging Face dir, CTranslate2 dir) of texar `model`'s weights under root."""
    import ctranslate2
    from utils.checkpoints.hf_dir import write_hf_dir
    from utils.checkpoints.hf_names import texar_to_hf_tensors
    from utils.model import model_size
    sizes = model_size(model.hparams.todict())
    hf_dir, ct2_dir = os.path.join(root, "hf"), os.path.join(root, "ct2")
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    write_hf_dir(hf_dir, texar_to_hf_tensors(state, sizes["n_layer"]), sizes)
    ctranslate2.converters.TransformersConverter(hf_dir).convert(ct2_dir, force=True)
    return hf_dir, ct2_dir


def load_generator(ct2_dir: str, engine: str, threads: int):
    import ctranslate2
    return ctranslate2.Generator(ct2_dir, device="cpu", compute_type=COMPUTE_TYPES[engine],
                                 intra_threads=threads, inter_threads=1)


def greedy(generator, token_rows, n: int):
    """n greedy new tokens per row (no end token stops them); ids per row."""
    results = generator.generate_batch(
        token_rows, max_length=n, min_length=n, sampling_topk=1, beam_size=1,
        end_token=[], include_prompt_in_result=False)
    return [r.sequences_ids[0] for r in results]


def id_tokens(ids_rows):
    """CTranslate2 takes token strings: GPT-2's vocabulary entries of the ids."""
    from utils.processor import get_encoder
    decoder = get_encoder().decoder
    return [[decoder[i] for i in row] for row in ids_rows]


def stream_main(model_dir: str, max_length: int, compute_type: str = "float32") -> None:
    """Read one prompt line from stdin, stream its greedy continuation."""
    import ctranslate2
    from utils.samples.interactive import StreamPrinter
    from utils.processor import EOS_ID, get_encoder
    encoder = get_encoder()
    generator = ctranslate2.Generator(model_dir, device="cpu", compute_type=compute_type,
                                      intra_threads=os.cpu_count())
    sys.stdout.write("Model input >>> ")
    sys.stdout.flush()
    ids = encoder.encode(sys.stdin.readline().rstrip("\n"))
    printer = StreamPrinter(encoder, EOS_ID)
    tokens = [encoder.decoder[i] for i in ids]
    for step in generator.generate_tokens(tokens, max_length=max_length - len(ids),
                                          sampling_topk=1):
        printer([step.token_id], [False])
    printer.close()
    print()


if __name__ == "__main__":
    if len(sys.argv) in (4, 5) and sys.argv[1] == "--stream":
        stream_main(sys.argv[2], int(sys.argv[3]), *sys.argv[4:])
    else:
        sys.exit("usage: ct2_engine.py --stream CT2_MODEL_DIR MAX_LENGTH [COMPUTE_TYPE]")
