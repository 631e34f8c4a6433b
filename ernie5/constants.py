"""Facts every layer shares, defined once: modality ids, the label of positions without a target, the format
tag of multimodal shards. Plain Python (no paddle), at the bottom of the import graph."""

TEXT, IMAGE, VIDEO, AUDIO, PAD = 0, 1, 2, 3, -1  # per-token modality ids (PAD: padding, not a modality)
MODALITY_NAMES = {TEXT: "text", IMAGE: "image", VIDEO: "video", AUDIO: "audio", PAD: "pad"}
NUM_MODALITIES = 4  # text, image, video, audio
VISUAL = (IMAGE, VIDEO)  # the modalities of the vision tokenizer (and of isolated routing's vision experts)

# the unified objective's per-modality loss terms (logged as loss_text, loss_visual, loss_audio)
MODALITY_TERMS = ("text", "visual", "audio")

IGNORE = -100  # label of a position with no target (cross-entropy skips it)

MULTIMODAL_FORMAT = "multimodal-3"  # meta.json "format" of multimodal shards (2: frame context groups, vis_in 4d;
# 3: 16-slot understanding tokens, resolution buckets, bit-flip maps per latent grid)
