"""Tiny random diffusers pipelines of the real classes (CLIP and T5 text encoders and
tokenizers, UNets, a VAE, the schedulers public checkpoints ship), saved with
`save_pretrained`: the public-checkpoint directories that the pipeline and demo tests load
(SD 1.x / 2.x, SDXL and its refiner, SD and SDXL inpainting, DeepFloyd IF stages I and
II)."""

import string

import diffusers
import torch
import transformers
from tokenizers import pre_tokenizers


def clip_tokenizer(**kwargs):
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    merges = [("r", "e"), ("re", "d</w>"), ("c", "i"), ("ci", "r"), ("a", "b"), ("b", "l")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, **kwargs)


def clip_text(seed, *, hidden=32, projection=None):
    tok = clip_tokenizer()
    config = transformers.CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        hidden_act="gelu" if projection else "quick_gelu",
        **({"projection_dim": projection} if projection else {}),
    )
    torch.manual_seed(seed)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config).eval(), tok


def tiny_vae(seed, **kw):
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        **kw,
    ).eval()


def tiny_unet(seed, **kw):
    torch.manual_seed(seed)
    kw.setdefault("in_channels", 4)  # 9: an inpainting UNet (latents, mask, masked image)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
        **kw,
    ).eval()
    with torch.no_grad():  # diffusers zero-initializes nothing here, but scale up the output
        unet.conv_out.weight.mul_(4.0)
    return unet


def sd_ddim(**kw):
    """Stable Diffusion's schedule with DDIM, as SD 2.1 ships it (eps unless `kw` says)."""
    return diffusers.DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        **kw,
    )


def sd_pipeline(path, scheduler, *, kind=""):
    """SD 1.x: diffusers' StableDiffusion{kind}Pipeline, kind "" | "Img2Img" | "Inpaint"
    (a 9-channel UNet); the editing kinds with `deterministic_vae`."""
    text_encoder, tokenizer = clip_text(1)
    pipe = getattr(diffusers, f"StableDiffusion{kind}Pipeline")(
        vae=deterministic_vae(2) if kind else tiny_vae(2),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=tiny_unet(
            3,
            in_channels=9 if kind == "Inpaint" else 4,
            cross_attention_dim=32,
            attention_head_dim=4,
        ),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return pipe


def sd2_pipeline(path):
    """SD 2.x: linear projections, upcast attention, v-prediction, "!" padding."""
    text_encoder, _ = clip_text(1)
    tokenizer = clip_tokenizer(pad_token="!")
    scheduler = sd_ddim(prediction_type="v_prediction")
    pipe = diffusers.StableDiffusionPipeline(
        vae=tiny_vae(2),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=tiny_unet(
            3,
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            upcast_attention=True,
        ),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return pipe


def xl_unet(seed, *, time_ids, cross, pooled, in_channels=4):
    return tiny_unet(
        seed,
        in_channels=in_channels,
        cross_attention_dim=cross,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(2, 1),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * time_ids + pooled,
    )


def euler():
    return diffusers.EulerDiscreteScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        timestep_spacing="leading",
    )


def sdxl_pipeline(path, *, inpaint=False):
    """The SDXL base, or (inpaint) StableDiffusionXLInpaintPipeline with a 9-channel UNet
    and `deterministic_vae`."""
    enc1, tok1 = clip_text(1, hidden=32)
    enc2, tok2 = clip_text(4, hidden=32, projection=16)
    kind = "Inpaint" if inpaint else ""
    pipe = getattr(diffusers, f"StableDiffusionXL{kind}Pipeline")(
        vae=deterministic_vae(2) if inpaint else tiny_vae(2),
        text_encoder=enc1,
        text_encoder_2=enc2,
        tokenizer=tok1,
        tokenizer_2=tok2,
        unet=xl_unet(3, time_ids=6, cross=64, pooled=16, in_channels=9 if inpaint else 4),
        scheduler=euler(),
    )
    pipe.save_pretrained(path)
    return pipe


def deterministic_vae(seed):
    """A tiny VAE whose posterior has a standard deviation of exp(-15) (logvar -30 from
    quant_conv): its samples equal its mean to ~1e-6, so that an inpainting pipeline's image
    encodings agree whatever noise each side draws for them."""
    vae = tiny_vae(seed)
    with torch.no_grad():
        c = vae.config.latent_channels
        vae.quant_conv.weight[c:].zero_()
        vae.quant_conv.bias[c:].fill_(-30.0)
    return vae


def refiner_pipeline(path, base):
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=base.vae,
        text_encoder=None,
        text_encoder_2=base.text_encoder_2,
        tokenizer=None,
        tokenizer_2=base.tokenizer_2,
        unet=xl_unet(5, time_ids=5, cross=32, pooled=16),
        scheduler=euler(),
        requires_aesthetics_score=True,
    )
    pipe.save_pretrained(path)
    return pipe


def t5_tokenizer():
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [(w, -3.0) for w in ["▁a", "▁red", "▁circle", "▁blue", "▁square", "▁two"]]
    pieces += [(f"<extra_id_{i}>", 0.0) for i in range(2, -1, -1)]
    return transformers.T5Tokenizer(vocab=pieces, extra_ids=3)


def tiny_t5(seed, vocab_size, width=32):
    config = transformers.T5Config(
        vocab_size=vocab_size,
        d_model=width,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=12,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as IF's T5-XXL
    )
    torch.manual_seed(seed)
    return transformers.T5EncoderModel(config).eval()


def if_unet(seed, stage, text_width=32):
    """A tiny UNet with the block types and switches of IF-I-XL's (stage "I") or IF-II-L's
    (stage "II") config.json (as tests/models/test_sd_unet.py), every parameter perturbed."""
    common = dict(
        norm_num_groups=8,
        block_out_channels=(32, 64),
        act_fn="gelu",
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        attention_head_dim=8,
        cross_attention_dim=32,
        cross_attention_norm="group_norm",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        encoder_hid_dim=text_width,
        encoder_hid_dim_type="text_proj",
        out_channels=6,
        resnet_time_scale_shift="scale_shift",
    )
    if stage == "I":
        config = dict(common, in_channels=3, layers_per_block=1, sample_size=8)
    else:
        config = dict(
            common,
            in_channels=6,
            sample_size=16,
            class_embed_type="timestep",
            layers_per_block=(1, 2),
            mid_block_scale_factor=1 / 0.7071,
            only_cross_attention=True,
            resnet_out_scale_factor=1 / 0.7071,
            resnet_skip_time_act=True,
            time_embedding_act_fn="gelu",
            time_embedding_dim=48,
        )
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.1 * torch.randn_like(p))
        # The variance outputs mostly in [-1, 1] (the learned range), as IF's are.
        unet.conv_out.weight[3:].mul_(0.25)
        unet.conv_out.bias[3:].mul_(0.25)
    return unet


def if_scheduler(sample_max_value):
    """IF's sampling scheduler: DDPM, squaredcos_cap_v2, learned-range variance, dynamic
    thresholding at the 95th percentile."""
    return diffusers.DDPMScheduler(
        beta_schedule="squaredcos_cap_v2",
        variance_type="learned_range",
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=sample_max_value,
    )


def stage_2_pipeline(path, *, text_encoder=None, tokenizer=None, seed=3):
    pipe = diffusers.IFSuperResolutionPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=if_unet(seed, "II"),
        scheduler=if_scheduler(1.0),
        image_noising_scheduler=diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return pipe


def stage_1_pipeline(path, seed=2, text_width=32):
    """IF stage I with its own tiny T5 (as IF-I-XL; a `text_width` other than the UNet's 32
    cross-attention channels is projected, as IF's 4096-wide T5 states are)."""
    tokenizer = t5_tokenizer()
    pipe = diffusers.IFPipeline(
        tokenizer=tokenizer,
        text_encoder=tiny_t5(seed - 1, len(tokenizer), width=text_width),
        unet=if_unet(seed, "I", text_width=text_width),
        scheduler=if_scheduler(1.5),
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return pipe


def tiny_transformer(seed):
    torch.manual_seed(seed)
    model = diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=64,  # >= the CLIPs' 32 + 32 channels; the T5's width
        caption_projection_dim=16,
        pooled_projection_dim=32,  # the two CLIPs' projections, 16 + 16
        out_channels=4,
        pos_embed_max_size=16,
    ).eval()
    with torch.no_grad():  # diffusers zero-initialises nothing we rely on; make all count
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def sd3_pipeline(path, *, with_t5=True):
    """SD 3: a tiny MMDiT (position table of 16), two CLIPs with projections, a T5 of the
    joint width 64 (or none), a VAE with scaling and shift factors, flow shift 3."""
    enc1, tok1 = clip_text(1, hidden=32, projection=16)
    enc2, tok2 = clip_text(4, hidden=32, projection=16)
    t5_tok = t5_tokenizer() if with_t5 else None
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=tiny_transformer(3),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(2, scaling_factor=1.5, shift_factor=0.1),
        text_encoder=enc1,
        tokenizer=tok1,
        text_encoder_2=enc2,
        tokenizer_2=tok2,
        text_encoder_3=tiny_t5(5, len(t5_tok), width=64) if with_t5 else None,
        tokenizer_3=t5_tok,
    )
    pipe.save_pretrained(path)
    return pipe
