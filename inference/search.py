"""Index a folder of images with a trained checkpoint, then search it by text or by image.

    python -m inference.search index --model-path checkpoints/best.pt --images photos/ --output indexes/photos
    python -m inference.search query --index indexes/photos --text "a dog on a beach" -k 5      # text -> image
    python -m inference.search query --index indexes/photos --image query.jpg                   # image -> image
    python -m inference.search query --model-path checkpoints/best.pt --captions captions.csv --image q.jpg
                                                                                                  # image -> text

Running `index` again on a grown folder encodes only new or changed files and drops deleted ones (see
inference/index.py for the format and how each index type is updated); links that lead out of the folder are
skipped and counted. Index types, for large collections:

    ... index ... --index-type flat     exact (default); embeddings memory-mapped and scanned in blocks
    ... index ... --index-type ivf  [--nlist N]                  approximate, through FAISS (pip install faiss-cpu)
    ... index ... --index-type hnsw [--m N --ef-construction N]  approximate, more memory, fastest queries
    ... query --index indexes/photos --text "a dog" --nprobe 128     (ivf; --ef-search N for hnsw)

Leaving out --index-type keeps an existing index's type; a different one rebuilds only the ANN structure.
"""
import argparse
import sys

from inference import ann
from inference.options import add_image_limits, add_trusted_root, image_limits, positive_int, worker_count


def parse_args(argv):
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(description="Index a folder of images, then search it by text or by image.",
                                formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True)
    ix = sub.add_parser("index", help="encode every image under a folder into an index", formatter_class=fmt)
    ix.add_argument("--model-path", required=True, help="checkpoint written by train.py")
    ix.add_argument("--images", required=True, help="folder searched recursively for jpg/jpeg/png/webp")
    ix.add_argument("--output", required=True, help="index folder (created, or updated when it exists)")
    ix.add_argument("--rebuild", action="store_true", help="re-encode everything (e.g. after a new checkpoint)")
    ix.add_argument("--num-workers", type=worker_count, default="auto", help="image-decoding processes, or auto")
    ix.add_argument("--index-type", choices=ann.KINDS,
                    help="flat: exact; ivf, hnsw: approximate, for millions of images. Left out: the existing "
                         "index's type, flat for a new index")
    ix.add_argument("--nlist", type=positive_int,
                    help="ivf: k-means lists. Left out: 4*sqrt(N) (at least 39 images per list) for a new index")
    ix.add_argument("--m", type=positive_int, help="hnsw: links per node. Left out: 32 for a new index")
    ix.add_argument("--ef-construction", type=positive_int,
                    help="hnsw: candidates kept while inserting. Left out: 40 for a new index")
    q = sub.add_parser("query", help="rank indexed images (or captions) against a text or an image",
                       formatter_class=fmt)
    q.add_argument("--index", help="index folder made by 'python -m inference.search index'")
    q.add_argument("--model-path", help="checkpoint; default: the one the index was built with")
    what = q.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="text -> image search")
    what.add_argument("--image", help="image -> image search, or image -> text with --captions")
    add_trusted_root(q)
    q.add_argument("--captions", help="rank these captions instead (.csv with a caption column, or .txt)")
    q.add_argument("-k", type=positive_int, default=10, help="results to show")
    q.add_argument("--nprobe", type=positive_int, help=f"ivf: lists scanned per query (more: slower and closer "
                                                       f"to exact). Left out: {ann.DEFAULT_NPROBE}, capped at nlist")
    q.add_argument("--ef-search", type=positive_int, help=f"hnsw: candidates kept per query (more: slower and "
                                                          f"closer to exact). Left out: {ann.DEFAULT_EF_SEARCH}")
    for s in (ix, q):
        s.add_argument("--text-model", help="tokenizer/config folder; default: the one named in the checkpoint")
        s.add_argument("--device", default="auto", help="auto, cpu or cuda")
        s.add_argument("--batch-size", type=positive_int, default=64, help="images or texts encoded at once")
        add_image_limits(s)
    return p.parse_args(argv)


# --help or a mistyped option is answered before torch and transformers load (seconds, hundreds of MB): the command
# line is checked here, and the heavy imports below run only once it parses.
if __name__ == "__main__":
    parse_args(sys.argv[1:])

from dataset import read_captions_csv
from engine.errors import run_entry
from engine.files import require_file
from inference.encoder import Encoder, read_lines
from inference.index import ImageIndex, SearchError, build_index


def run_index(a):
    encoder = Encoder(a.model_path, a.device, a.text_model, batch_size=a.batch_size, num_workers=a.num_workers,
                      limits=image_limits(a))
    summary = build_index(encoder, a.images, a.output, rebuild=a.rebuild, index_type=a.index_type, nlist=a.nlist,
                          m=a.m, ef_construction=a.ef_construction)
    structure = f"; {summary['index_type']} structure {summary['ann']}" if summary["ann"] else ""
    print(f"{summary['index_type']} index {a.output}: {summary['images']} images ({summary['new']} encoded, "
          f"{summary['unchanged']} unchanged, {summary['removed']} removed, {summary['failed']} unreadable or "
          f"failed to decode, {summary['outside']} outside the folder skipped)"
          f"{structure}")
    return summary


def run_query(a):
    if a.captions and a.text:
        raise SearchError("--captions ranks captions for an --image; for text -> image leave out --captions")
    index = None
    if a.index:
        index = ImageIndex.load(a.index, trusted_root=a.trusted_root).tune(a.nprobe, a.ef_search)
    elif not a.captions:
        raise SearchError("--index is required for image search (only image -> text with --captions needs none)")
    elif a.nprobe or a.ef_search:
        raise SearchError("--nprobe and --ef-search tune the search of an --index; leave them out with --captions")
    if a.model_path is None and index is None:
        raise SearchError("pass --model-path (or an --index, whose checkpoint is then used)")
    encoder = Encoder(a.model_path or index.model_path(), a.device, a.text_model, batch_size=a.batch_size,
                      limits=image_limits(a))
    if index is not None:
        index.check_encoder(encoder)

    if a.text is not None:
        if not a.text.strip():
            raise SearchError("--text is empty")
        query = encoder.encode_texts([a.text])
    else:
        require_file(a.image, "image")
        query = encoder.encode_images([encoder.open_image(a.image)])  # (1, D)

    if a.captions:
        captions = read_captions_file(a.captions)
        scores, ids = (query @ encoder.encode_texts(captions).T).topk(min(a.k, len(captions)), dim=1)
        scores = scores.clamp(-1, 1)  # cosines of unit vectors, up to float rounding
        results = [{"rank": r + 1, "score": float(s), "caption": captions[i]}
                   for r, (s, i) in enumerate(zip(scores[0].tolist(), ids[0].tolist(), strict=True))]
        print(f"image -> text: {a.image} against {len(captions)} captions")
        for res in results:
            print(f"{res['rank']:4d}  {res['score']:.4f}  {res['caption']}")
        return results

    scores, ids = index.search(query, a.k)
    # ivf: -1 = lists ran dry
    found = [(s, i) for s, i in zip(scores[0].tolist(), ids[0].tolist(), strict=True) if i >= 0]
    results = [{"rank": r + 1, "score": s, "id": i, "path": index.path(i)} for r, (s, i) in enumerate(found)]
    kind = "text -> image" if a.text is not None else "image -> image"
    print(f"{kind}: {a.text!r} over {len(index)} images ({index.kind})" if a.text is not None
          else f"{kind}: {a.image} over {len(index)} images ({index.kind})")
    for res in results:
        shown = res["path"] or f"{index.files[res['id']]} (now outside {index.root}: run index again)"
        print(f"{res['rank']:4d}  {res['score']:.4f}  {shown}")
    return results


def read_captions_file(path):
    """Captions to rank for image -> text: a CSV with a `caption` column, or a text file with one per line."""
    require_file(path, "captions file", "pass a .csv with a caption column or a .txt with one caption per line")
    if path.lower().endswith(".csv"):
        captions = [values[0] for _, values in read_captions_csv(path, columns=("caption",))]
    else:
        captions = [" ".join(line.split()) for line in read_lines(path, "captions")]
    captions = list(dict.fromkeys(c for c in captions if c))  # unique, in file order
    if not captions:
        raise SearchError(f"{path} holds no captions")
    return captions


def main(argv=None):
    a = parse_args(argv)
    return run_entry(run_index if a.command == "index" else run_query, a)


if __name__ == "__main__":
    main()
