"""Teacher: the data set and the full-precision model that Qimera quantizes."""
import streamlit as st

from qimera_engine import TEACHERS, DataError, InputSpec, data_stamp
from qimera_engine.ui import common, paths
from qimera_engine.ui.logic import DATASETS, page_hint, teachers_for
from qimera_engine.ui.paths import ALLOWED_ENV, PathNotAllowed, allowed_data_spec, allowed_path
from qimera_engine.ui.tasks import teacher_key, teacher_task

SHIPPED_LABEL = "CIFAR-10 with the shipped ResNet-20 (offline)"

common.setup_page("Teacher", "🎓")
st.title("Teacher")
st.markdown("The FP classifier to quantize, and the real test images used **only** to measure accuracy. "
            "Qimera never shows the real images to the generator or the student.")

shipped = paths.shipped_teacher()
SHIPPED = "shipped"
kinds = ([SHIPPED] if shipped else []) + list(DATASETS)
kind = st.selectbox("Data set", kinds, index=kinds.index("digits"), key="t_data",
                    format_func=lambda k: SHIPPED_LABEL if k == SHIPPED else DATASETS[k],
                    help="Digits are built in and work offline, and so does the ResNet-20 that ships with the app "
                         "(with a sample of CIFAR-10 test images); the others need files or a download.")
path, download, checkpoint, pretrained, train, missing = "", False, None, False, False, False
if kind == SHIPPED:  # the teacher of the shipped runs: nothing to choose
    name, (checkpoint, spec) = "resnet20", shipped
    st.caption("ResNet-20 trained on CIFAR-10 (pytorch_resnet_cifar10's weights), measured on the 500 CIFAR-10 "
               "test images that ship with the app: the teacher of the CIFAR-10 runs on Home, offline.")
else:
    if kind in ("cifar10", "cifar100"):
        path = st.text_input("Data folder", key="t_root", placeholder="default: $QIMERA_HOME/data",
                             help="Folder holding torchvision's CIFAR files (cifar-10-batches-py / cifar-100-python), "
                                  f"inside $QIMERA_HOME or a folder listed in {ALLOWED_ENV}.")
        download = st.checkbox("Download if missing", key="t_download", help="Fetch the data set from the internet.")
    elif kind in ("folder", "imagenet"):
        path = st.text_input("Image folder", key="t_root", help="ROOT/<class name>/<image files>, inside $QIMERA_HOME "
                             f"or a folder listed in {ALLOWED_ENV}.")
    try:
        spec = allowed_data_spec(kind, path)
    except PathNotAllowed as e:
        st.error(str(e))
        st.stop()

    names = teachers_for(kind)
    name = st.selectbox("Teacher", names, key="t_name", help="Model architecture (input size and normalisation "
                        "come with it).")
    sources = ["Cached or trained here", "Checkpoint file path", "Upload a checkpoint", "Model zoo (download)"]
    source = st.radio("Weights", sources, key="t_source", horizontal=True,
                      help="Digits: trained here in seconds. CIFAR on a CPU: use a checkpoint or the zoo.")
    if source == "Checkpoint file path":
        typed = st.text_input("Checkpoint path", key="t_ckpt", help="A PyTorch state dict (.pt/.pth, read with "
                              f"weights_only) or a .safetensors file, inside $QIMERA_HOME or a folder listed in {ALLOWED_ENV}.")
        if typed:
            try:
                checkpoint = str(allowed_path(typed))
            except PathNotAllowed as e:
                st.error(str(e))
                st.stop()
    elif source == "Upload a checkpoint":
        up = st.file_uploader("Checkpoint file", type=["pt", "pth", "safetensors", "bin"], key="t_upload")
        shared = st.checkbox("Keep it for other browser sessions", key="t_upload_shared",
                             help="Uploads are private to this session unless kept for all.")
        checkpoint = str(common.save_upload(up, shared)) if up is not None else None
    elif source == "Model zoo (download)":
        pretrained = True
        st.caption("torchvision (resnet18, resnet50, mobilenet_v2) and pytorchcv (resnet20_cifar10/100) weights.")
    train = source == "Cached or trained here" and st.checkbox(
        "Train it again here", key="t_train", help="Trains on the train split and caches it (CIFAR needs a GPU).")
    missing = source in sources[1:3] and not checkpoint  # a checkpoint asked for and not given yet

key = teacher_key(name, spec, checkpoint, pretrained, train)
if st.button("Load or train the teacher", type="primary", key="t_go"):
    if missing:
        st.error("Give a checkpoint first (a path or an upload).")
    else:
        common.registry().start_task(teacher_task(name, spec, checkpoint, pretrained, download, train),
                                     label=f"teacher {name} on {spec}", key=key)
        # becomes the Quantize page's choice once it has loaded (see teacher_status)
        st.session_state.setdefault("teacher_pending", {})[key] = dict(
            teacher=name, test_data=spec, checkpoint=checkpoint, pretrained=pretrained, download=download)


@st.fragment(run_every=common.POLL_SECONDS if (j := common.registry().find(key)) and j.active else None)
def teacher_status():
    job = common.registry().find(key)
    if job is None:
        st.info("Press **Load or train the teacher** to measure its FP accuracy "
                "(the digits teacher trains in seconds the first time).")
        return
    if job.active:
        common.job_panel(job, curves=False, key="teacher")
    elif job.status == "failed":
        st.error(f"Could not prepare the teacher: {page_hint(job.error or '')}")
        if st.session_state.get("teacher_choice") == st.session_state.get("teacher_pending", {}).get(key):
            st.session_state.pop("teacher_choice", None)  # a failed choice is never kept
    elif job.result:
        r = job.result
        if key in st.session_state.get("teacher_pending", {}):
            st.session_state["teacher_choice"] = st.session_state["teacher_pending"][key]
        c1, c2, c3 = st.columns(3)
        c1.metric("FP top-1", f"{r['top1']:.2f}%")
        c2.metric("Classes", r["classes"])
        c3.metric("Test images", r["n_test"])
        st.caption(f"Weights: `{r['info'].get('weights', '?')}` · penultimate features: {r['feature_dim']}")
        st.success("The Quantize page starts from this teacher and data set.")


teacher_status()

st.subheader("Real test images")
_, size, channels, mean, std, _ = TEACHERS[name]
try:
    images, labels, classes = common.real_images(spec, InputSpec(size, channels, tuple(mean), tuple(std)), 32, 0,
                                                 common.home_key(), data_stamp(spec))
    common.show_image_grid(images, ncols=16)
    st.caption("Labels, row by row: " + ", ".join(classes[int(y)] for y in labels))
except (DataError, ValueError, OSError) as e:
    st.warning(f"No images to show for {spec!r}: {page_hint(str(e))}")
