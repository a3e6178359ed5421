"""Train/held-out split of the Python 3.11 docs (seed 0, 5 % held out) and a 16k byte-level BPE
trained on the training files; writes .gpudata/ in the repository root (git-ignored)."""
import glob, os, random
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), ".gpudata")
files = sorted(glob.glob("/usr/share/doc/python3.11/html/_sources/**/*.rst.txt", recursive=True))
random.Random(0).shuffle(files)
n_hold = len(files) // 20
hold, train = files[:n_hold], files[n_hold:]
os.makedirs(OUT + "/train", exist_ok=True); os.makedirs(OUT + "/heldout", exist_ok=True)
for split, fs in (("train", train), ("heldout", hold)):
    for f in fs:
        dst = os.path.join(OUT + "", split, f.replace("/", "_"))
        if not os.path.exists(dst):
            os.symlink(f, dst)
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train(train, trainers.BpeTrainer(vocab_size=16384, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
tok.save(OUT + "/tokenizer.json")
print(len(train), len(hold), tok.get_vocab_size())
