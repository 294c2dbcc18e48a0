# RealAlign gRPC server on CUDA.
#   docker build -t realalign-server .
#   docker run --gpus all -p 50051:50051 -p 9090:9090 -v /models:/models realalign-server \
#       --backbone sd35m=/models/stable-diffusion-3.5-medium

FROM mcr.microsoft.com/dotnet/sdk:10.0 AS build
WORKDIR /src
COPY . .
# TorchBackend=cuda selects TorchSharp-cuda-linux (libtorch with its CUDA libraries) in RealAlign.Core.
# Ubuntu 24.04's libstdc++ has GLIBCXX_3.4.32, so the Debian-12 GLIBCXX patch is switched off.
RUN dotnet publish src/RealAlign.Server -c Release -p:TorchBackend=cuda -p:PatchTorchSharpGlibcxx=false -o /app

# The ASP.NET Core 10 runtime, taken from Microsoft's Ubuntu 24.04 image of the same release.
FROM mcr.microsoft.com/dotnet/aspnet:10.0-noble AS aspnet

FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libgomp1 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=aspnet /usr/share/dotnet /usr/share/dotnet
RUN ln -s /usr/share/dotnet/dotnet /usr/bin/dotnet
# Listen on all interfaces inside the container (--bind overrides).
ENV DOTNET_RUNNING_IN_CONTAINER=true \
    DOTNET_NOLOGO=1 \
    REALALIGN_BIND=0.0.0.0
COPY --from=build /app /app
WORKDIR /app
EXPOSE 50051 9090
# Options (--backbone, --dtype, --max-queue, ...) follow the image name in `docker run`.
ENTRYPOINT ["dotnet", "/app/RealAlign.Server.dll"]
