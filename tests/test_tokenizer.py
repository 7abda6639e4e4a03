from pipelines.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, clip_tokenizer


def test_real_clip_vocabulary_size_and_special_ids():
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == VOCAB_SIZE == 49408
    assert tokenizer.bos_token_id == BOS_ID == 49406
    assert tokenizer.eos_token_id == EOS_ID == 49407


def test_encodes_like_openai_clip():
    # ids of OpenAI CLIP / SD 1.x for "a photo of a cat"
    assert clip_tokenizer()("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_matches_open_clip_tokenizer_and_pads_like_sd1():
    import open_clip

    reference = open_clip.get_tokenizer("ViT-B-32")
    tokenizer = clip_tokenizer()
    for text in ("the number 7 in bold green", "Van Gogh's starry night!", "a red italic seven, 1920s"):
        ours = tokenizer(text, padding="max_length", max_length=77).input_ids
        theirs = reference([text])[0].tolist()
        length = theirs.index(EOS_ID) + 1
        assert ours[:length] == theirs[:length]
        assert ours[length:] == [EOS_ID] * (77 - length)  # SD 1.x pads with the end token


def test_sd2_prompts_are_padded_with_exclamation_marks_and_cut_as_open_clip_tokenizes_them():
    # SD 2.x's OpenCLIP text tower was trained on open_clip's ids: zeros after the end token (id 0 is "!", the pad
    # token of SD 2.x's tokenizer) and a prompt past 77 tokens cut to 76 with its end token kept last. The ids
    # every method conditions on (padded_ids) must be those ids exactly, the long prompt's too.
    import open_clip

    from pipelines.tokenizer import padded_ids

    texts = ["a red italic seven", " ".join(["a photo of a cat"] * 20)]
    ids = padded_ids(clip_tokenizer(pad_token="!"), texts)
    assert ids.shape == (2, 77) and ids[1, -1] == EOS_ID
    assert ids.tolist() == open_clip.get_tokenizer("ViT-B-32")(texts).tolist()


def test_plain_words_leave_out_the_punctuation_and_quotes_around_each_word():
    from pipelines.tokenizer import plain_words

    # a concept quoted in a prompt is still the concept's words: the attacks leave them out of what they write
    assert plain_words('A "red" seven, in \'Van Gogh\'s\' style!') == ["a", "red", "seven", "in", "van", "gogh's",
                                                                      "style"]  # fmt: skip
    assert plain_words("... !") == []
