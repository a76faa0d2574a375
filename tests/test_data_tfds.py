"""The TFDS source on a tiny dataset built here in ArrayRecord format (no TensorFlow needed)."""

import numpy as np
import pytest
from data_testing import TFDS_NAME, caption_index, write_tfds

from cascade_jax.data import DataConfig, make_train_loader


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_tfds(tmp_path_factory.mktemp("tfds"), n=10, empty_caption=(4,))


def tfds_cfg(data_dir, **kw):
    return DataConfig(source="tfds", tfds_name=TFDS_NAME, tfds_data_dir=data_dir, image_key="picture",
                      caption_key="meta/text", num_workers=2, **kw)


def test_tfds_source_batches_and_skips(data_dir):
    loader = make_train_loader(tfds_cfg(data_dir, filters=("aesthetic>=2",)), global_batch_size=2, image_size=64,
                               multi_aspect_ratio=["1/1", "1/2"], seed=0, process_index=0, process_count=1)
    it = iter(loader)
    batches = [next(it) for _ in range(8)]
    assert {caption_index(c) for b in batches for c in b["captions"]} == {2, 3, 5, 6, 7, 8, 9}
    for b in batches:
        assert b["images"].shape == (2, *b["bucket"], 3) and b["images"].dtype == np.uint8
    assert it.skip_counts["no_caption"] >= 1 and it.skip_counts["filtered"] >= 2
    it.close()


def test_tfds_errors_name_the_dataset_and_feature(data_dir):
    with pytest.raises(ValueError, match="no_such_captions.*no such dataset"):
        make_train_loader(DataConfig(source="tfds", tfds_name="no_such_captions", tfds_data_dir=data_dir),
                          global_batch_size=1, image_size=64)
    with pytest.raises(ValueError, match="'mnist'.* not prepared.*tfds build mnist"):
        make_train_loader(DataConfig(source="tfds", tfds_name="mnist", tfds_data_dir=data_dir), global_batch_size=1,
                          image_size=64)
    with pytest.raises(ValueError, match="no image feature 'image'.*picture"):
        make_train_loader(DataConfig(source="tfds", tfds_name=TFDS_NAME, tfds_data_dir=data_dir,
                                     caption_key="meta/text"), global_batch_size=1, image_size=64)
