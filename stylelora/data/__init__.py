"""Training data: folder scan, captions, image checks, buckets, latent/text cache, Dataset + sampler.

The pipeline, in the order a training run uses it (all of it before any model is loaded, except the
encoders the caches are given):

    items, scan_report = scan.scan_folder(DATA, extra_trigger=...)       # kohya / flat / metadata.jsonl
    checked = checks.check_items(items, min_side=..., max_pixels=...)   # DataError if nothing is usable
    path = checks.write_skip_report(run_dir, checked.skipped)
    print(checks.skip_summary(checked.skipped, checked.total, path))
    train_set = dataset.TrainingDataset(checked.kept, DatasetOptions(buckets=BucketConfig(...), captions=...),
                                        latent_cache=latent_cache.LatentCache(vae_encode, vae_id, cache_dir))
    train_set.cache_latents()                                            # encode once, before training
    sampler = buckets.BucketBatchSampler(train_set.buckets, batch_size, seed=..., num_replicas=..., rank=...)
    loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=dataset.collate_samples)
    each epoch: sampler.set_epoch(e); train_set.set_epoch(e)

Modules: errors (DataError), scan (TrainItem, ScanReport), checks (CheckedImage, SkippedImage, RGB
loading), captions (CaptionOptions, shuffle/dropout, ss_tag_frequency), buckets (BucketConfig, CropPlan,
BucketBatchSampler), dataset (TrainingDataset), latent_cache (LatentCache, TextEmbeddingCache).
"""
