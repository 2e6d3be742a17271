from itertools import islice

from mmagent.train.data.stream import TaskMixture


def mixture(seed=0):
    recs = {"caption": [{"id": f"c{i}"} for i in range(50)], "vqa": [{"id": f"v{i}"} for i in range(30)]}
    return TaskMixture(recs, {"caption": 2, "vqa": 1}, seed)


def test_tasks_are_mixed_by_ratio():
    ids = [r["id"] for _, r in islice(mixture().examples(0), 3000)]
    share = sum(i.startswith("c") for i in ids) / len(ids)
    assert 0.63 < share < 0.70  # 2:1


def test_stream_from_a_position_equals_the_uninterrupted_tail():
    whole = [r["id"] for _, r in islice(mixture().examples(0), 400)]
    resumed = [r["id"] for _, r in islice(mixture().examples(250), 150)]
    assert resumed == whole[250:]


def test_each_epoch_visits_every_example_once_and_seeds_differ():
    vqa = [r["id"] for _, r in islice(TaskMixture({"vqa": [{"id": i} for i in range(30)]}, {"vqa": 1}, 0)
                                      .examples(0), 60)]
    assert sorted(vqa[:30]) == list(range(30)) and vqa[:30] != vqa[30:]
    assert [r["id"] for _, r in islice(mixture(1).examples(0), 50)] != [r["id"] for _, r in islice(mixture(0).examples(0), 50)]
