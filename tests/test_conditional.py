"""Conditional fine-tuning: source<TAB>target pairs, their records, a loss on targets only.

The loss is checked by hand (log-softmax of the model's logits, source masked
out), against transformers' GPT-2 holding the TF fixtures' weights, and by
changing what the source positions predict, which must change nothing.
"""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gpt2_generate_main
import gpt2_train_main
import prepare_data
from test_hf_format import hf_name_of_tf
from test_train import model_config, train_config
from utils.data.records import CONTEXT_FIELD, PreparedSplit
from utils.errors import UserError
from utils.training.lm import evaluate, lm_nll
from utils.model import build_model, gpt2_hparams
from utils.data.pairs import fit_pair
from utils.processor import EOS_ID, get_encoder
from utils.checkpoints.tf_reader import TFCheckpointReader

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tf_gpt2")
TRAIN = ["Where do fish live?\tFish live in water.",
         "What do bees make?\tBees make honey.",
         "Which season is the coldest?\tWinter is the coldest season.",
         "What do you call a baby dog?\tA baby dog is a puppy."]
TEST = ["What do cows drink?\tCows drink water.", "Who bakes bread?"]


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def prepare(data, *flags):
    prepare_data.main(["--quiet", "--data_dir", str(data), *map(str, flags)])


@pytest.fixture
def pairs_dir(tmp_path):
    d = tmp_path / "pairs"
    d.mkdir()
    write(d / "train.tsv", TRAIN)
    write(d / "dev.tsv", TRAIN[:2])
    write(d / "test.tsv", TEST)
    prepare(d, "--max_seq_length", 24)
    return d


def test_pairs_become_framed_records_with_their_context_length(pairs_dir):
    encode = get_encoder(None).encode
    split = PreparedSplit(str(pairs_dir / "train.npy"))
    assert split.conditional
    for i, line in enumerate(TRAIN):
        source, target = line.split("\t")
        context = [EOS_ID] + encode(source) + [EOS_ID]
        assert split.example(i) == context + encode(target) + [EOS_ID]
        assert split.target_starts[i] == len(context)
    assert split.num_targets == sum(len(encode(line.split("\t")[1])) + 1 for line in TRAIN)
    test = PreparedSplit(str(pairs_dir / "test.npy"))
    assert test.example(1) == [EOS_ID] + encode("Who bakes bread?") + [EOS_ID]
    assert test.context_lengths[1] == test.lengths[1]  # no reference target


def test_plain_text_records_keep_their_old_format(tmp_path):
    d = tmp_path / "plain"
    d.mkdir()
    write(d / "train.txt", ["one line", "two lines here"])
    prepare(d)
    data = np.load(d / "train.npy", allow_pickle=False)
    assert CONTEXT_FIELD not in data.dtype.names  # old files and new plain files alike
    split = PreparedSplit(str(d / "train.npy"))
    assert not split.conditional and split.target_starts.tolist() == [1, 1]
    assert split.num_targets == int((split.lengths - 1).sum())


def test_truncation_keeps_the_target_and_cuts_the_source_from_its_start():
    source, target = list(range(10, 20)), [1, 2, 3]
    assert fit_pair(source, target, 11) == ([15, 16, 17, 18, 19], [1, 2, 3], True)
    assert fit_pair(source, target, 16) == (source, target, True)
    # A target that cannot fit beside one source token keeps its start, unclosed.
    assert fit_pair(source, list(range(9)), 8) == ([19], [0, 1, 2, 3, 4], False)


def test_summary_counts_cut_sources_and_names_a_target_that_cannot_fit(tmp_path, capsys):
    d = tmp_path / "long"
    d.mkdir()
    write(d / "train.tsv", ["a b c d e f g h i j k l m n o p\tshort answer",
                            "short question\t" + "word " * 30,
                            "tiny\tfits"])
    prepare(d, "--max_seq_length", 12)
    out = capsys.readouterr().out
    assert "1 sources cut from the start" in out
    assert "1 targets too long to fit whole (first at line 2" in out
    split = PreparedSplit(str(d / "train.npy"))
    assert split.example(1)[-1] != EOS_ID and split.lengths[1] == 12  # unclosed


@pytest.mark.parametrize("files,lines,message", [
    (("train.tsv",), ["no tab on this line"], r"train.tsv line 1 is not a source<TAB>target"),
    (("train.tsv",), ["ok\tfine", "\tanswer without question"], r"train.tsv line 2 is not"),
    (("dev.tsv",), ["question without answer\t  "], r"dev.tsv line 1 is not"),
    (("train.tsv",), ["a\tb\tc"], r"train.tsv line 1 has 2 tabs"),
    (("train.tsv", "dev.txt"), ["q\ta"], r"holds both .txt and .tsv splits"),
])
def test_bad_pairs_are_one_line_errors_naming_file_and_line(tmp_path, files, lines,
                                                            message):
    d = tmp_path / "bad"
    d.mkdir()
    for name in files:
        write(d / name, lines)
    with pytest.raises(UserError, match=message):
        prepare(d)
    assert not list(d.glob("*.npy"))  # nothing written


def test_pairs_need_room_for_both_sides(tmp_path):
    d = tmp_path / "short"
    d.mkdir()
    write(d / "train.tsv", ["q\ta"])
    with pytest.raises(UserError, match="at least 5 for source<TAB>target"):
        prepare(d, "--max_seq_length", 4)


# ------------------------------------------------------------------ the loss

def tiny_model(seed=0, n_vocab=50257):
    torch.manual_seed(seed)
    return build_model(gpt2_hparams(n_vocab, 32, 16, 2, 2)).eval()


def nll_by_hand(logits, ids, start, length):
    """Summed NLL of tokens start..length-1 of one example, from its logits."""
    log_probs = F.log_softmax(logits.double(), dim=-1)
    return -sum(float(log_probs[t - 1, ids[t]]) for t in range(start, length))


def test_conditional_nll_equals_a_direct_computation_masking_the_source(pairs_dir):
    model = tiny_model()
    split = PreparedSplit(str(pairs_dir / "train.npy"))
    indices = list(range(len(split)))
    ids, lengths = split.batch(indices, EOS_ID)
    with torch.no_grad():
        nll, count = lm_nll(model, ids, lengths, per_token=True,
                            starts=split.starts(indices))
        expected = 0.0
        for i in indices:
            one = torch.tensor([split.example(i)])
            logits = model(inputs=one, decoding_strategy="train_greedy").logits[0]
            expected += nll_by_hand(logits, one[0].tolist(), split.target_starts[i],
                                    split.lengths[i])
    assert int(count) == split.num_targets
    assert float(nll) == pytest.approx(expected, rel=1e-6)
    result = evaluate(model, split, batch_size=3, device=torch.device("cpu"),
                      progress=False)
    assert result.tokens == split.num_targets
    assert result.perplexity == pytest.approx(np.exp(expected / split.num_targets), rel=1e-6)


def test_conditional_nll_equals_transformers_gpt2_on_the_tf_fixture():
    import transformers
    from utils.checkpoints.weights import load_weights, resolve_model
    prefix = os.path.join(FIXTURES, "models", "tiny_a", "model.ckpt")
    ours = load_weights(resolve_model(pretrain_checkpoint=prefix, download=False)).model
    hf_state = {}
    with TFCheckpointReader(prefix) as reader:
        for tf_name in reader.variables():
            array = np.array(reader.read(tf_name))
            hf_state[hf_name_of_tf(tf_name)] = torch.from_numpy(
                array[0] if array.ndim == 3 else array)
    hf_state["lm_head.weight"] = hf_state["transformer.wte.weight"]
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50257, n_positions=32, n_embd=8, n_head=2, n_layer=2))
    hf.load_state_dict(hf_state, strict=False)
    hf.eval()
    rows = [[EOS_ID, 40, 588, 11, EOS_ID, 307, 1110, 13, EOS_ID],
            [EOS_ID, 1867, EOS_ID, 3666, 2068, EOS_ID]]
    starts, lengths = [5, 3], [9, 6]
    ids = torch.tensor([row + [EOS_ID] * (9 - len(row)) for row in rows])
    with torch.no_grad():
        nll, count = lm_nll(ours, ids, torch.tensor(lengths), per_token=True,
                            starts=torch.tensor(starts))
        theirs = sum(nll_by_hand(hf(torch.tensor([row])).logits[0], row, s, n)
                     for row, s, n in zip(rows, starts, lengths))
    assert int(count) == (9 - 5) + (6 - 3)
    assert float(nll) == pytest.approx(theirs, rel=1e-5)


def test_source_positions_never_contribute_to_the_loss():
    model = tiny_model()
    ids = torch.tensor([[EOS_ID, 11, 12, 13, 14, EOS_ID, 21, 22, EOS_ID]])
    lengths, starts = torch.tensor([9]), torch.tensor([6])
    base, _ = lm_nll(model, ids, lengths, starts=starts)

    class GarbageAtSource(torch.nn.Module):
        """The model, but what the source positions predict is replaced."""
        def forward(self, **kwargs):
            out = model(**kwargs)
            logits = out.logits.clone()
            logits[:, :5] = torch.randn_like(logits[:, :5]) * 50
            return out._replace(logits=logits)

    changed, _ = lm_nll(GarbageAtSource(), ids, lengths, starts=starts)
    assert float(changed.detach()) == float(base.detach())
    # And the gradient reaches no source position's logits.
    logits = model(inputs=ids[:, :-1]).logits.detach().requires_grad_()
    fake = type("Fixed", (torch.nn.Module,), {"forward": lambda self, **kw: type(
        "Out", (), {"logits": logits})()})()
    lm_nll(fake, ids, lengths, starts=starts)[0].backward()
    assert float(logits.grad[:, :5].abs().sum()) == 0.0
    assert float(logits.grad[:, 5:].abs().sum()) > 0.0


# ------------------------------------------------------------------ the command lines

def test_do_test_on_pairs_writes_source_generated_and_reference(tmp_path, pairs_dir, capsys):
    out = tmp_path / "out"
    gpt2_train_main.main(["--quiet", "--do_test", "--from_scratch",
                          "--config_model", model_config(tmp_path),
                          "--config_train", train_config(tmp_path, pairs_dir),
                          "--output_dir", str(out)])
    lines = (out / "test_samples.tsv").read_text(encoding="utf-8").splitlines()
    first, second = (line.split("\t") for line in lines)
    assert first[0] == "What do cows drink?" and first[2] == "Cows drink water."
    assert len(first) == 3 and len(second) == 2 and second[0] == "Who bakes bread?"
    assert "source<TAB>generated target" in capsys.readouterr().out


def test_training_pairs_need_targets(tmp_path, pairs_dir):
    os.replace(pairs_dir / "test.npy", pairs_dir / "dev.npy")  # one dev line lacks its target
    with pytest.raises(UserError, match="sources without a target"):
        gpt2_train_main.main(["--quiet", "--do_eval", "--from_scratch",
                              "--config_model", model_config(tmp_path),
                              "--config_train", train_config(tmp_path, pairs_dir),
                              "--output_dir", str(tmp_path / "o")])


def test_generate_conditional_frames_each_prompt_as_a_source(monkeypatch):
    encoder = get_encoder(None)
    writer = type("W", (), {"encoder": encoder, "end_token": EOS_ID})()
    assert gpt2_generate_main.prompt_context(writer, " Who bakes bread? ", True) == \
        [EOS_ID] + encoder.encode("Who bakes bread?") + [EOS_ID]
    assert gpt2_generate_main.prompt_context(writer, "Hi", False) == encoder.encode("Hi")
    with pytest.raises(UserError, match="--conditional continues sources: give them"):
        gpt2_generate_main.main(["--conditional"])
