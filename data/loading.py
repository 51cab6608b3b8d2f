"""One model load at a time in the process: the lock every `from_pretrained` of a model takes (the door, the demo).

It lives in `data`, the layer both the pipeline and the demo may import.
"""

from __future__ import annotations

import threading

# Held around every model load (`from_pretrained`) in this process. transformers swaps `PreTrainedModel.tie_weights`
# and `init_weights` for no-ops on the class while a checkpoint loads (initialization.no_tie_weights /
# no_init_weights) and puts back what it found: two loads at once in two threads (the demo's handlers, a test beside
# a served demo) can leave them swapped for the rest of the process, so every model built or loaded later has its
# embeddings untied (Gemma 3's lm_head trained apart from its embedding). transformers#44940 (open) makes it
# thread-local; until then, one load at a time.
LOADING = threading.RLock()
